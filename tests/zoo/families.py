"""The architecture zoo: the model families users bring, built tiny and seeded.

Each :class:`Family` builds a fresh model (same weights for the same seed), its
sample input, and says where it comes from. Hugging Face families are built from
their ``*Config`` classes with the task head users load; the vision shapes are
:mod:`tests.zoo.vision` (plain torch, torchvision's module structure).

After the seeded init, every Linear, HF ``Conv1D`` and ``groups=1`` Conv2d gets a
decaying (power-law) spectrum, like a trained layer's, with a knee at a quarter
of its rank past which the values are 1000 times smaller (a numerically low-rank
weight), so that a near-lossless setting (``energy`` 0.9999) still shrinks the
layer and gives a small output error, while a stronger reduction gives a
measurable one (weights tied to an embedding are left alone). Other tensors keep their seeded
random init.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.zoo import vision

VOCAB = 96
BATCH, TOKENS = 2, 8


@dataclass(frozen=True)
class Family:
    key: str  # the test id and the row of docs/models.md
    title: str  # what users know it as, and the class built
    source: str  # "transformers" or "plain torch"
    build_model: Callable[[], nn.Module]
    make_input: Callable[[int], Any]  # seed -> a sample input (tensor or dict)
    hf: bool = False
    text: bool = False  # a tokenizer is saved beside it, and the CLI's default input fits
    # transform -> a part of the message of its expected refusal (the whole surgery
    # refused, clearly: a transform that takes none of the family's module types...)
    refusals: dict[str, str] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.build_model()
        spectral_init_(model, seed)
        return model.eval()

    def sample(self, seed: int = 1) -> Any:
        return self.make_input(seed)


# -------------------------------------------------------------- trained-like weights


def _matrix_spectrum(out_f: int, in_f: int, gen: torch.Generator, decay: float) -> torch.Tensor:
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)
    s[max(1, k // 4) :] *= 1e-3  # numerically of rank k/4: a small tail past the knee
    s = s / s.norm() * math.sqrt(out_f)  # about unit-variance outputs for unit inputs
    return (u * s) @ v.T


def spectral_init_(model: nn.Module, seed: int, decay: float = 1.5) -> None:
    """Give every Linear, ``Conv1D`` and ``groups=1`` Conv2d a power-law spectrum."""
    gen = torch.Generator().manual_seed(seed + 12345)
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.data_ptr() in embedded:
            continue
        if isinstance(m, nn.Linear):
            new = _matrix_spectrum(w.shape[0], w.shape[1], gen, decay)
        elif type(m).__name__ == "Conv1D":  # HF: weight stored (in, out)
            new = _matrix_spectrum(w.shape[1], w.shape[0], gen, decay).T
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            flat = _matrix_spectrum(w.shape[0], w[0].numel(), gen, decay)
            new = flat.reshape(w.shape)
        else:
            continue
        with torch.no_grad():
            w.copy_(new)


# ------------------------------------------------------------------------ inputs


def token_ids(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(seed))


def text_input(seed: int) -> dict[str, torch.Tensor]:
    ids = token_ids(seed)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def causal_input(seed: int) -> dict[str, torch.Tensor]:
    ids = token_ids(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def seq2seq_input(seed: int) -> dict[str, torch.Tensor]:
    x = causal_input(seed)
    x["decoder_input_ids"] = token_ids(seed + 100)[:, :5]
    return x


def pixels(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": vision.image_input(seed)}


def clip_input(seed: int) -> dict[str, torch.Tensor]:
    return {**causal_input(seed), "pixel_values": vision.image_input(seed)}


MEL_BINS, FRAMES = 16, 32


def whisper_input(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_features": torch.randn(BATCH, MEL_BINS, FRAMES, generator=g),
        "decoder_input_ids": token_ids(seed + 100)[:, :5],
    }


def image(seed: int) -> torch.Tensor:
    return vision.image_input(seed)


# ------------------------------------------------------------ Hugging Face builders


def _tf():
    import transformers

    return transformers


DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def bert():
    return _tf().BertModel(_tf().BertConfig(**ENCODER))


def roberta():
    config = _tf().RobertaConfig(**{**ENCODER, "max_position_embeddings": 66}, num_labels=3)
    return _tf().RobertaForSequenceClassification(config)


def distilbert():
    config = _tf().DistilBertConfig(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return _tf().DistilBertForSequenceClassification(config)


def gpt2():
    config = _tf().GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return _tf().GPT2LMHeadModel(config)


def gpt_neox():
    config = _tf().GPTNeoXConfig(**{**DECODER, "num_key_value_heads": None})
    return _tf().GPTNeoXForCausalLM(config)


def llama():
    return _tf().LlamaForCausalLM(_tf().LlamaConfig(**DECODER))


def mistral():
    return _tf().MistralForCausalLM(_tf().MistralConfig(**DECODER, sliding_window=16))


def qwen2():
    return _tf().Qwen2ForCausalLM(_tf().Qwen2Config(**DECODER))


def gemma():
    return _tf().GemmaForCausalLM(_tf().GemmaConfig(**DECODER, head_dim=8))


def phi():
    return _tf().PhiForCausalLM(_tf().PhiConfig(**DECODER, partial_rotary_factor=0.5))


def t5():
    config = _tf().T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return _tf().T5ForConditionalGeneration(config)


def bart():
    config = _tf().BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    return _tf().BartForConditionalGeneration(config)


def vit_hf():
    config = _tf().ViTConfig(
        image_size=32, patch_size=8, num_channels=3, num_labels=vision.NUM_CLASSES, **{
            k: ENCODER[k] for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
            )
        },
    )  # fmt: skip
    return _tf().ViTForImageClassification(config)


def clip():
    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    image = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, num_channels=3,
    )  # fmt: skip
    config = _tf().CLIPConfig(text_config=text, vision_config=image, projection_dim=16)
    return _tf().CLIPModel(config)


def whisper():
    config = _tf().WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=FRAMES // 2,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    return _tf().WhisperForConditionalGeneration(config)


# ------------------------------------------------------------------------ the zoo


NO_CONV2D = {"cp": "matches no Conv2d module"}  # cp takes Conv2d only


def _hf(key, title, builder, make_input, text=False, refusals=NO_CONV2D) -> Family:
    return Family(
        key, title, "transformers", builder, make_input, hf=True, text=text, refusals=refusals
    )


def _tv(key, title, builder, **kw) -> Family:
    return Family(key, title, "plain torch", builder, image, **kw)


FAMILIES: list[Family] = [
    _hf("bert", "BERT (BertModel)", bert, text_input, text=True),
    _hf("roberta", "RoBERTa (RobertaForSequenceClassification)", roberta, text_input, text=True),
    _hf(
        "distilbert",
        "DistilBERT (DistilBertForSequenceClassification)",
        distilbert,
        text_input,
        text=True,
    ),
    _hf(
        "gpt2",
        "GPT-2 (GPT2LMHeadModel)",
        gpt2,
        causal_input,
        text=True,
        # tucker takes no Conv1D: only the lm_head is selected, and it is tied
        refusals={**NO_CONV2D, "tucker": "nothing was replaced"},
    ),
    _hf("gpt_neox", "GPT-NeoX (GPTNeoXForCausalLM)", gpt_neox, causal_input, text=True),
    _hf("llama", "Llama (LlamaForCausalLM)", llama, causal_input, text=True),
    _hf("mistral", "Mistral (MistralForCausalLM)", mistral, causal_input, text=True),
    _hf("qwen2", "Qwen2 (Qwen2ForCausalLM)", qwen2, causal_input, text=True),
    _hf("gemma", "Gemma (GemmaForCausalLM)", gemma, causal_input, text=True),
    _hf("phi", "Phi (PhiForCausalLM)", phi, causal_input, text=True),
    _hf("t5", "T5 (T5ForConditionalGeneration)", t5, seq2seq_input, text=True),
    _hf("bart", "BART (BartForConditionalGeneration)", bart, seq2seq_input, text=True),
    _hf("vit_hf", "ViT (ViTForImageClassification)", vit_hf, pixels, refusals={}),
    _hf("clip", "CLIP (CLIPModel)", clip, clip_input, refusals={}),
    _hf("whisper", "Whisper (WhisperForConditionalGeneration)", whisper, whisper_input),
    _tv("resnet_basic", "ResNet, BasicBlock (resnet18 shape)", vision.resnet_basic),
    _tv("resnet_bottleneck", "ResNet, Bottleneck (resnet50 shape)", vision.resnet_bottleneck),
    _tv("mobilenet_v2", "MobileNetV2 (inverted residual)", vision.MobileNetV2),
    _tv("mobilenet_v3", "MobileNetV3 (inverted residual + SE)", vision.MobileNetV3),
    _tv("efficientnet", "EfficientNet (MBConv + SE)", vision.EfficientNet),
    _tv("convnext", "ConvNeXt (CNBlock)", vision.ConvNeXt),
    _tv("vit_tv", "ViT, torchvision (nn.MultiheadAttention)", vision.VisionTransformer),
    _tv("swin", "Swin (shifted window attention)", vision.SwinTransformer),
]

BY_KEY = {f.key: f for f in FAMILIES}


# ------------------------------------------------------------------- a tokenizer

WORDS = (
    "the of and to a in is it you that he was for on are with as i his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been"
).split()


def save_tokenizer(directory: Path) -> None:
    """A word-level fast tokenizer of :data:`VOCAB` entries (special tokens at the ids the
    configs use), built offline and saved beside a model."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS[: VOCAB - len(specials)])}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", model_max_length=48,
    )  # fmt: skip
    fast.save_pretrained(directory)
