"""Streamed surgery of Hugging Face checkpoint directories (``tnsurgery.streaming``):
a Llama-shaped model saved as several shards gives the same model as the in-memory
path (factorize, tt, qat, calibrated + sequential), written as shards that
``from_pretrained`` and ``tnsurgery.load`` read back; tensors no rule touches are
copied through in their dtype; ``--dry-run`` reads no tensor data; broken
checkpoints exit 2 naming the file and write nothing; GPT-2, BERT and T5 shapes go
the same way; streaming's peak memory is below the in-memory path's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import tnsurgery
from tnsurgery import streaming, surgery
from tnsurgery.cli import cli
from tnsurgery.compare import SampleInputError
from tnsurgery.errors import ModelLoadError
from tnsurgery.io.checkpoint import INDEX_NAME, Checkpoint
from tnsurgery.streaming import memory

transformers = pytest.importorskip("transformers")

LAYERS = "model.layers.*.**"


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "llama"
    _llama().save_pretrained(d, max_shard_size="40KB")
    return d


def _spec(transform: str, params: dict, match: str = LAYERS, **extra) -> dict:
    rule = {"match": match, "types": ["Linear", "Conv1D"], "transform": transform}
    return {"version": 1, "rules": [{**rule, "params": params}], **extra}


def _ids(vocab=96, shape=(2, 12)):
    return {"input_ids": torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))}


def _first(out):
    return out[0] if isinstance(out, tuple) else out.logits if hasattr(out, "logits") else out[0]


def test_the_fixture_is_sharded(llama_dir):
    assert (llama_dir / INDEX_NAME).is_file()
    assert len(list(llama_dir.glob("model-*.safetensors"))) >= 4


@pytest.mark.parametrize(
    "transform, params",
    [("factorize", {"param_ratio": 0.5}), ("tt", {"rank": 4}), ("qat", {})],
)
def test_streaming_equals_in_memory(llama_dir, tmp_path, transform, params):
    spec = _spec(transform, params)
    x = _ids()
    out = tmp_path / "out"
    result = streaming.apply_checkpoint(
        spec, llama_dir, out, sample_input=x, max_shard_bytes=50_000
    )
    assert result.plan.pipeline == "blocks"
    reference = surgery.apply(
        transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval(), spec, x
    )
    ref_plan = surgery.get_manifest(reference)["plan"]
    # the same targets, settings and errors, target by target
    ours = {t.name: t for t in result.plan.targets}
    assert set(ours) == {t["name"] for t in ref_plan["targets"]}
    for t in ref_plan["targets"]:
        mine = ours[t["name"]]
        assert (mine.status, mine.resolved, mine.params_after) == (
            t["status"], t["resolved"], t["params_after"],
        )  # fmt: skip
        for key in ("weight_error", "output_error"):
            if t[key] is not None:
                assert getattr(mine, key) == pytest.approx(t[key], rel=1e-5, abs=1e-7)
    assert result.plan.output_error == pytest.approx(
        surgery.get_manifest(reference)["output_error"], rel=1e-5
    )
    # written as shards, loaded back by tnsurgery and by transformers: the same model
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    loaded = tnsurgery.load(out)
    via_hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    y = _ids(shape=(3, 9))
    with torch.no_grad():
        expected = reference(**y).logits
        torch.testing.assert_close(loaded(**y).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(via_hf(**y).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pipeline", ["auto", "whole"])
@pytest.mark.parametrize("sequential", [False, True])
def test_calibrated_equals_in_memory(llama_dir, tmp_path, pipeline, sequential):
    """Block by block (one block, two streams of calibration hidden states) gives the
    statistics, factors and sequential refit of the whole-model calibration."""
    cal = {
        "data": {"source": "random", "shape": [12], "vocab_size": 96},
        "samples": 16, "batch_size": 8, "sequential": sequential, "pipeline": pipeline,
    }  # fmt: skip
    spec = _spec("factorize", {"param_ratio": 0.5}, calibration=cal)
    result = streaming.apply_checkpoint(spec, llama_dir, tmp_path / "out")
    assert result.plan.pipeline == ("blocks" if pipeline == "auto" else "whole")
    reference = surgery.apply(transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval(), spec)
    ref = surgery.get_manifest(reference)
    # no sample input given: both measured on the first calibration batch
    assert result.plan.output_error == pytest.approx(ref["output_error"], rel=1e-5)
    ours = {t.name: t for t in result.plan.targets}
    for t in ref["plan"]["targets"]:
        assert ours[t["name"]].predicted_output_error == pytest.approx(
            t["predicted_output_error"], rel=1e-5
        )
        seq = t["resolved"].get("sequential_output_error")
        assert (seq is None) == (not sequential)
        if seq is not None:
            assert ours[t["name"]].resolved["sequential_output_error"] == pytest.approx(
                seq, rel=1e-4
            )
    loaded = tnsurgery.load(tmp_path / "out")
    x = _ids(shape=(2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["plan"]["pipeline"] == result.plan.pipeline
    if sequential:
        assert manifest["plan"]["calibration"]["sequential"]["refitted"] > 0


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_budget_is_allocated_block_by_block(llama_dir, tmp_path, calibrated):
    """A first pass over the blocks gathers each layer's error curve and its block's
    sensitivity; the allocation meets the budget, and beats a uniform ratio by far."""
    cal = {"data": {"source": "random", "shape": [12], "vocab_size": 96}, "samples": 16}
    rule = {"match": LAYERS, "types": ["Linear"], "transform": "factorize", "params": {}}
    spec = {"version": 1, "rules": [rule], "budget": {"params": 0.5}}
    uniform = _spec("factorize", {"param_ratio": 0.5})
    if calibrated:
        spec["calibration"] = uniform["calibration"] = cal
    x = _ids()
    result = streaming.apply_checkpoint(spec, llama_dir, tmp_path / "out", sample_input=x)
    assert result.plan.pipeline == "blocks"
    report = result.plan.budget
    assert report["achieved"] <= 0.5 + 1e-9 and report["achieved"] > 0.45
    assert report["sensitivity"].startswith("output error of the layer's block")
    assert len({layer["param_ratio"] for layer in report["layers"]}) > 1  # not uniform
    flat = streaming.apply_checkpoint(uniform, llama_dir, tmp_path / "flat", sample_input=x)
    assert result.plan.output_error < 0.8 * flat.plan.output_error
    # what the plan says is what was written: the manifest's budget and the layers' ranks
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["plan"]["budget"]["layers"] == report["layers"]
    loaded = tnsurgery.load(tmp_path / "out")
    ratio = {layer["name"]: layer["param_ratio"] for layer in report["layers"]}
    for name, r in ratio.items():
        module = loaded.get_submodule(name)
        dense = module.in_features * module.out_features
        kept = sum(p.numel() for p in module.parameters() if p.dim() == 2)
        assert kept <= r * dense + max(module.in_features, module.out_features)
    # the whole pipeline keeps the in-memory budget exactly
    whole = {**spec, "calibration": {**cal, "pipeline": "whole"}}
    memory = surgery.apply(
        transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval(), whole, x
    )
    again = streaming.apply_checkpoint(whole, llama_dir, tmp_path / "whole", sample_input=x)
    assert again.plan.pipeline == "whole"
    assert again.plan.budget["layers"] == surgery.get_manifest(memory)["plan"]["budget"]["layers"]


def test_the_block_stack_can_be_named(llama_dir, tmp_path):
    cal = {"data": {"source": "random", "shape": [12], "vocab_size": 96}, "samples": 8,
           "blocks": "model.layers.*"}  # fmt: skip
    spec = _spec("factorize", {"param_ratio": 0.5}, calibration=cal)
    assert streaming.apply_checkpoint(spec, llama_dir, None, dry_run=True).plan.pipeline == "blocks"
    wrong = _spec("factorize", {"param_ratio": 0.5}, calibration={**cal, "blocks": "model.nope.*"})
    plan = streaming.apply_checkpoint(wrong, llama_dir, None, dry_run=True).plan
    assert plan.pipeline == "whole" and "model.nope" in plan.streaming["why"]


def test_untouched_tensors_are_copied_in_their_dtype(tmp_path):
    d = tmp_path / "bf16"
    original = _llama(torch.bfloat16)
    original.save_pretrained(d, max_shard_size="40KB")
    out = tmp_path / "out"
    spec = _spec("factorize", {"param_ratio": 0.5}, match="model.layers.*.mlp.*")
    streaming.apply_checkpoint(spec, d, out)
    written = Checkpoint.open(out)
    state = original.state_dict()
    untouched = [
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight", "model.layers.2.input_layernorm.weight",
    ]  # fmt: skip
    for name in untouched:
        t = written.tensor(name)
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, state[name])
    factor = next(k for k in written.header if k.startswith("model.layers.0.mlp.up_proj."))
    assert written.tensor(factor).dtype == torch.bfloat16  # built in float32, cast back
    written.close()
    loaded = tnsurgery.load(out)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_dry_run_reads_no_tensor_data(llama_dir, tmp_path, monkeypatch):
    def unreadable(self, name):
        raise AssertionError(f"tensor data read: {name}")

    monkeypatch.setattr(Checkpoint, "tensor", unreadable)
    monkeypatch.setattr("safetensors.torch.load_file", unreadable)
    spec = _spec("factorize", {"param_ratio": 0.5})
    result = streaming.apply_checkpoint(spec, llama_dir, None, dry_run=True)
    totals = result.plan.totals()
    assert result.manifest is None and totals["replaced"] == 21
    assert totals["params_after"] < totals["params_before"]
    assert totals["model_bytes_after"] < totals["model_bytes_before"]
    # the same through the CLI, and nothing is written
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    res = CliRunner().invoke(cli, ["apply", str(spec_path), str(llama_dir), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dry_run"] is True and data["written"] == []
    assert not (llama_dir.parent / "llama-surgered").exists()
    # (the monkeypatch does bite: a real apply reads tensors)
    with pytest.raises(AssertionError, match="tensor data read"):
        streaming.apply_checkpoint(spec, llama_dir, tmp_path / "real")
    assert not (tmp_path / "real").exists()


def test_a_dry_run_leaves_weight_dependent_ranks_open(llama_dir):
    spec = _spec("factorize", {"energy": 0.9})
    result = streaming.apply_checkpoint(spec, llama_dir, None, dry_run=True)
    assert all("energy" in t.reason for t in result.plan.targets)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _apply_cli(spec: dict, model: Path, out: Path, tmp_path: Path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    return CliRunner().invoke(cli, ["apply", str(spec_path), str(model), "-o", str(out)])


def _broken(kind: str, llama_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    d = _copy(llama_dir, tmp_path / kind)
    index = json.loads((d / INDEX_NAME).read_text())
    shard = d / sorted(set(index["weight_map"].values()))[1]
    if kind == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return d, shard.name
    if kind == "missing":
        shard.unlink()
        return d, shard.name
    if kind == "mismatched":
        with safe_open(str(shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        name = next(iter(tensors))
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return d, name
    if kind == "bad_index":
        (d / INDEX_NAME).write_text("{not json")
        return d, INDEX_NAME
    if kind == "index_lies":  # the index names a tensor its shard lacks
        index["weight_map"]["model.extra.weight"] = shard.name
        (d / INDEX_NAME).write_text(json.dumps(index))
        return d, "model.extra.weight"
    if kind == "escaping_index":
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../elsewhere.safetensors"
        (d / INDEX_NAME).write_text(json.dumps(index))
        return d, "elsewhere"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "missing", "mismatched", "bad_index", "index_lies", "escaping_index"]
)
def test_broken_checkpoints_exit_2_naming_the_file_and_write_nothing(llama_dir, tmp_path, kind):
    d, named = _broken(kind, llama_dir, tmp_path)
    out = tmp_path / "out"
    res = _apply_cli(_spec("factorize", {"param_ratio": 0.5}), d, out, tmp_path)
    assert res.exit_code == 2, res.output
    assert named in res.output and "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left
    with pytest.raises(ModelLoadError):
        streaming.apply_checkpoint(_spec("factorize", {"rank": 2}), d, None, dry_run=True)


def _family(name: str):
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=96, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg), "transformer.h.*.**", "blocks"
    if name == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96,
            vocab_size=96, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.BertModel(cfg), "encoder.layer.*.**", "blocks"
    cfg = transformers.T5Config(
        num_layers=2, d_model=48, d_ff=96, num_heads=4, d_kv=12, vocab_size=96,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg), "**", "whole"


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_gpt2_bert_t5_take_the_same_path(name, tmp_path):
    torch.manual_seed(0)
    model, match, pipeline = _family(name)
    model.eval().save_pretrained(tmp_path / name, max_shard_size="30KB")
    spec = _spec("factorize", {"param_ratio": 0.5}, match=match)
    x = _ids(shape=(2, 10))
    if name == "t5":
        x["decoder_input_ids"] = _ids(shape=(2, 6))["input_ids"]
    out = tmp_path / "out"
    result = streaming.apply_checkpoint(
        spec, tmp_path / name, out, sample_input=x, max_shard_bytes=40_000
    )
    assert result.plan.pipeline == pipeline
    reference = surgery.apply(type(model).from_pretrained(tmp_path / name).eval(), spec, x)
    assert result.plan.output_error == pytest.approx(
        surgery.get_manifest(reference)["output_error"], rel=1e-5
    )
    loaded = tnsurgery.load(out)
    with torch.no_grad():
        torch.testing.assert_close(
            _first(loaded(**x)), _first(reference(**x)), rtol=1e-5, atol=1e-6
        )
    # and through the CLI (the default sample input), with its pipeline in the manifest
    res = _apply_cli(spec, tmp_path / name, tmp_path / "cli", tmp_path)
    assert res.exit_code == 0, res.output
    assert f"pipeline: {pipeline}" in res.output
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["plan"]["pipeline"] == pipeline and manifest["output_error"] is not None


PEAK = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from pathlib import Path
    import tnsurgery
    from tnsurgery import streaming, surgery
    from tnsurgery.streaming.memory import MemoryWatch
    src, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    spec = {"version": 1, "rules": [{"match": "model.layers.*.**", "types": ["Linear"],
            "transform": "factorize", "params": {"param_ratio": 0.5}}]}
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    transformers.LlamaForCausalLM  # (imported before the watch starts, in both runs)
    with MemoryWatch(torch.device("cpu")) as watch:  # anonymous memory, sampled
        if how == "stream":
            streaming.apply_checkpoint(spec, src, out, sample_input=x)
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(src)
            small = surgery.apply(m, spec, x)
            small.save_pretrained(out)
    print(json.dumps({"peak_kb": watch.report()["peak_host_bytes"] // 1024}))
    """
)


def test_streaming_peak_memory_is_below_the_in_memory_path(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m", max_shard_size="4MB")
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    peaks = {}
    for how in ("stream", "memory"):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "m"), str(tmp_path / how), how],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[how] = json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"]
    model_kb = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors")) // 1024
    # the model is about 60 MB: in memory it is held at least once; streamed, a block
    assert peaks["memory"] > model_kb
    assert peaks["stream"] < peaks["memory"] / 2, peaks


def test_a_tied_head_is_refused_and_the_blocks_still_stream(tmp_path):
    """A rule over every Linear of a Llama with tied embeddings: the head is refused
    (tied), as in memory, and the blocks are still streamed; the tie survives."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).eval().save_pretrained(
        tmp_path / "m", max_shard_size="30KB"
    )
    spec = _spec("factorize", {"param_ratio": 0.5}, match="**")
    x = _ids()
    result = streaming.apply_checkpoint(spec, tmp_path / "m", tmp_path / "out", sample_input=x)
    assert result.plan.pipeline == "blocks"
    reference = surgery.apply(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval(), spec, x
    )
    statuses = {t["name"]: t["status"] for t in surgery.get_manifest(reference)["plan"]["targets"]}
    assert {t.name: t.status for t in result.plan.targets} == statuses
    assert statuses["lm_head"] == "refuse"
    loaded = tnsurgery.load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-6)


def test_a_hub_cache_snapshot_streams_and_a_link_out_is_refused(llama_dir, tmp_path):
    """A Hugging Face hub cache snapshot links its shards to ``../../blobs/``: followed;
    a shard linking anywhere else is refused, naming it."""
    repo = tmp_path / "models--org--llama"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in llama_dir.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    spec = _spec("factorize", {"param_ratio": 0.5})
    plan = streaming.apply_checkpoint(spec, snapshot, None, dry_run=True).plan
    assert plan.totals()["replaced"] == 21
    elsewhere = _copy(llama_dir, tmp_path / "elsewhere")
    shard = sorted(elsewhere.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ModelLoadError, match=f"{shard.name} is a symbolic link out"):
        streaming.apply_checkpoint(spec, elsewhere, None, dry_run=True)


def test_large_allocations_are_mapped_during_the_run_and_the_threshold_set_after(
    llama_dir, tmp_path, monkeypatch
):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim",))

    monkeypatch.setattr(memory, "_LIBC", FakeLibc())
    tnsurgery.apply_checkpoint(_spec("factorize", {"param_ratio": 0.5}), llama_dir, tmp_path / "o")
    settings = [c for c in calls if c[0] != "trim"]
    assert [c[:2] for c in settings] == [
        (memory.M_MMAP_THRESHOLD, 1 << 20),
        (memory.M_TRIM_THRESHOLD, 128 << 10),
        (memory.M_MMAP_THRESHOLD, 32 << 20),
        (memory.M_TRIM_THRESHOLD, 64 << 20),
    ]
    first, last = calls.index(settings[1]), calls.index(settings[2])
    assert [c for c in calls[first:last] if c == ("trim",)]  # the blocks ran in between
    # a run failing inside sets it back too; with no glibc nothing is called
    calls.clear()
    spec = _spec("factorize", {"param_ratio": 0.5})
    with pytest.raises(SampleInputError):
        tnsurgery.apply_checkpoint(spec, llama_dir, tmp_path / "p", sample_input="not ids")
    assert [c for c in calls if c[0] != "trim"] == settings
    assert not (tmp_path / "p").exists()
    monkeypatch.setattr(memory, "_LIBC", None)
    with memory.large_allocations_mapped():
        pass
