"""``nn.MultiheadAttention`` with its projections as ordinary ``nn.Linear`` children:
:class:`SplitMultiheadAttention`, what surgery puts in place of an attention module
before compressing its projections.

``nn.MultiheadAttention`` keeps the query, key and value projections in one bare
parameter (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
with other key and value sizes) and hands ``out_proj.weight`` to
``F.multi_head_attention_forward`` itself, never calling ``out_proj``: no transform can
replace any of them. :class:`SplitMultiheadAttention` computes the same function (outputs
and attention weights, every option of ``forward``) with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` as modules it calls, which any transform that takes a Linear
can then replace. Plain torch, like every layer here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tnsurgery.dense_weight import DenseWeight

__all__ = ["PARTS", "SplitMultiheadAttention", "attend"]

PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The Linear children of a :class:`SplitMultiheadAttention`, in call order."""


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    num_heads: int,
    add_zero_attn: bool,
    dropout_p: float,
    training: bool,
    batch_first: bool,
    need_weights: bool,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``nn.MultiheadAttention.forward`` computes between its input projection and
    its output projection, on inputs already projected (``q``, ``k``, ``v`` in the
    caller's layout, each of size ``embed_dim``): the heads' attention, concatenated, in
    the caller's layout (before ``out_proj``), and the attention weights (``None``
    without ``need_weights``). Masks, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout,
    ``is_causal`` and unbatched inputs as ``F.multi_head_attention_forward`` treats them;
    ``scaled_dot_product_attention`` when the weights are not needed.

    torch.fx records it as one call (:func:`torch.fx.wrap`), so that a model using a
    :class:`SplitMultiheadAttention` traces, its projections as module calls."""
    if q.is_nested or k.is_nested or v.is_nested:
        raise AssertionError(
            "SplitMultiheadAttention does not take NestedTensor inputs (nor does "
            "nn.MultiheadAttention outside of its fast path)"
        )
    is_batched = q.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=q.dtype,
        check_other=False,
    )
    if batch_first and is_batched:
        q, k, v = (t.transpose(1, 0) for t in (q, k, v))
    F._mha_shape_check(q, k, v, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = q.shape
    src_len = k.shape[0]
    head_dim = embed_dim // num_heads
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint alone goes to scaled_dot_product_attention
    elif key_padding_mask is not None:
        is_causal = False  # the merged mask is no longer causal
    if k.shape[:2] != v.shape[:2]:
        raise AssertionError(
            f"key's sequence and batch dims {k.shape[:2]} do not match value's {v.shape[:2]}"
        )
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros.to(v.dtype)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                f"{key_padding_mask.shape}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    weights = None
    if need_weights:
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        out = F.scaled_dot_product_attention(
            q.view(bsz, num_heads, tgt_len, head_dim),
            k.view(bsz, num_heads, src_len, head_dim),
            v.view(bsz, num_heads, src_len, head_dim),
            attn_mask,
            dropout_p,
            is_causal,
        )
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    if not is_batched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(1, 0)
    return out, weights


torch.fx.wrap("attend")


class InProjection:
    """What ``in_proj_weight`` / ``in_proj_bias`` of a :class:`SplitMultiheadAttention`
    read: the ``weight`` (or ``bias``) of its ``q_proj``, ``k_proj`` and ``v_proj``
    stacked, as ``nn.MultiheadAttention`` holds them. It backs a
    :class:`~tnsurgery.dense_weight.DenseWeight` (values rebuilt at each read, from the
    projections as they are now, compressed ones included; never written)."""

    def __init__(self, owner: SplitMultiheadAttention, attr: str) -> None:
        self.owner, self.attr = owner, attr

    def projections(self) -> list[nn.Module]:
        return [self.owner.q_proj, self.owner.k_proj, self.owner.v_proj]

    def to_dense(self) -> torch.Tensor:
        """The stacked tensor: ``torch.cat`` of the three projections' ``attr``."""
        return torch.cat([getattr(p, self.attr) for p in self.projections()])

    def parameters(self):
        """The parameters of the three projections (whose ``requires_grad`` it reports)."""
        for p in self.projections():
            yield from p.parameters()


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
    as ``nn.Linear`` children that its forward calls (so transforms can replace them).

    Same constructor arguments and ``forward`` as ``nn.MultiheadAttention`` (outputs and
    attention weights alike; :meth:`from_mha` makes the exact equivalent of a trained
    one), and the attributes model code reads on one: ``embed_dim``, ``kdim``, ``vdim``,
    ``num_heads``, ``head_dim``, ``dropout``, ``batch_first``, ``add_zero_attn``,
    ``bias_k``/``bias_v``, ``_qkv_same_embed_dim``, ``merge_masks``. ``in_proj_weight``
    and ``in_proj_bias`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` with
    other key and value sizes) read the projections' tensors stacked as
    ``nn.MultiheadAttention`` holds them: a :class:`~tnsurgery.dense_weight.DenseWeight`,
    values rebuilt at each read (from compressed projections too), never written.

    Being a tensor subclass, that ``in_proj_weight`` makes ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder`` leave their fused fast paths ("some Tensor argument
    has_torch_function"), which would read the stacked weights and bypass the
    projections: they run their ordinary path, through this module's forward.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self.has_bias = bool(bias)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, self.embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, self.embed_dim, bias=bias)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The exact equivalent of ``mha`` (its tensors copied, on its device and dtype,
        ``requires_grad`` and training mode kept); ``mha`` is left as it is."""
        bias = mha.in_proj_bias is not None
        ref = mha.out_proj.weight
        with torch.device("meta"):  # no initialization: every tensor is copied below
            new = cls(
                mha.embed_dim,
                mha.num_heads,
                dropout=mha.dropout,
                bias=bias,
                add_bias_kv=mha.bias_k is not None,
                add_zero_attn=mha.add_zero_attn,
                kdim=mha.kdim,
                vdim=mha.vdim,
                batch_first=mha.batch_first,
            )
        new = new.to_empty(device=ref.device).to(ref.dtype)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
            grads = [mha.in_proj_weight.requires_grad] * 3
        else:
            projs = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            weights = [p.detach() for p in projs]
            grads = [p.requires_grad for p in projs]
        biases = mha.in_proj_bias.detach().split(e) if bias else (None, None, None)
        with torch.no_grad():
            for name, w, b, grad in zip(PARTS[:3], weights, biases, grads, strict=True):
                proj = getattr(new, name)
                proj.weight.copy_(w)
                proj.weight.requires_grad_(grad)
                if b is not None:
                    proj.bias.copy_(b)
                    proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            for name in ("weight", "bias"):
                src = getattr(mha.out_proj, name)
                if src is not None:
                    getattr(new.out_proj, name).copy_(src)
                    getattr(new.out_proj, name).requires_grad_(src.requires_grad)
            for name in ("bias_k", "bias_v"):
                src = getattr(mha, name)
                if src is not None:
                    getattr(new, name).copy_(src)
                    getattr(new, name).requires_grad_(src.requires_grad)
        return new.train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights)``, the weights
        ``None`` unless ``need_weights`` (averaged over heads with
        ``average_attn_weights``)."""
        attended = attend(
            self.q_proj(query),
            self.k_proj(key),
            self.v_proj(value),
            key_padding_mask,
            attn_mask,
            self.bias_k,
            self.bias_v,
            self.num_heads,
            self.add_zero_attn,
            self.dropout,
            self.training,
            self.batch_first,
            need_weights,
            average_attn_weights,
            is_causal,
        )
        return self.out_proj(attended[0]), attended[1]

    merge_masks = nn.MultiheadAttention.merge_masks

    # ------------------------------------------- what code reads on a MultiheadAttention
    def _stacked(self, attr: str, rows: int, cols: int | None) -> torch.Tensor | None:
        view = InProjection(self, attr)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return view.to_dense()  # a graph is recorded: the values, in it
        ref = next((p for p in self.parameters() if p.is_floating_point()), None)
        if ref is None:  # (no tensor to take the dtype and device from)
            return None
        shape = (rows,) if cols is None else (rows, cols)
        return DenseWeight(view, shape, ref.dtype, ref.device)  # type: ignore[arg-type]

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """The q, k and v weights stacked ``(3 * embed_dim, embed_dim)``, read only;
        ``None`` when keys or values have another size (as on ``nn.MultiheadAttention``)."""
        if not self._qkv_same_embed_dim:
            return None
        return self._stacked("weight", 3 * self.embed_dim, self.embed_dim)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The q, k and v biases stacked ``(3 * embed_dim,)``, read only; ``None``
        without bias."""
        return self._stacked("bias", 3 * self.embed_dim, None) if self.has_bias else None

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        """``q_proj.weight`` when keys or values have another size, else ``None``."""
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        """``k_proj.weight`` when keys or values have another size, else ``None``."""
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        """``v_proj.weight`` when keys or values have another size, else ``None``."""
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    # ------------------------------------------------------------------- manifest
    def config(self) -> dict[str, Any]:
        """JSON-compatible constructor arguments (what the manifest records)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "bias": self.has_bias,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], current: nn.Module | None = None
    ) -> SplitMultiheadAttention:
        """An empty layer from :meth:`config` (its tensors are loaded afterwards)."""
        return cls(**config)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}"
        )
