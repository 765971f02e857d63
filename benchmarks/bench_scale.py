"""Large checkpoints: streamed surgery of a 1B-shaped (CPU) or 7B-shaped (GPU) checkpoint.

The checkpoint is generated here, once (cached under ``bench_out/``): a Llama-shaped
model, ``blocks`` × [4 × hidden² (q, k, v, o), 3 × hidden×inter (gate, up, down)],
bfloat16, written as shards with their index like ``save_pretrained``. Each matrix
has a trained-like spectrum: ``W = U diag(s) Vᵀ`` with Gaussian ``U``, ``V`` and
``s_k ∝ (1 + k)^-0.5`` (slowly decaying, as trained LLM weights' are), so a rank
cut loses what it would on a real model. The vocabulary is kept small (8192): the
blocks are the subject.

Every Linear of the blocks is factorized to 25 % of its parameters
(``param_ratio`` 0.25) through ``tnsurgery.streaming.apply_checkpoint``, the path
``tnsurgery apply SPEC DIR -o OUT`` takes, each run in its own process:

- data-free (one sample of 128 random token ids measures the output error, block
  by block);
- calibrated block by block (32 samples of 128 random token ids on the CPU, 128 of
  2048 on a GPU), on the full checkpoint and on one with half the blocks: the peak
  memory of a calibrated run should not depend on the number of blocks.

Figures: wall time end to end (reading, surgery, writing the shards and the
manifest), peak host memory beyond the start (anonymous memory: what tnsurgery
allocates; the shards' memory-mapped pages are the kernel's cache and not counted;
the resident total is given too), peak device memory, next to the time of copying
the checkpoint's shards (the I/O floor), and how much the anonymous memory grew
from the end of the first block to the end of the last (a streamed run's memory
should be flat from block to block).

    python benchmarks/bench_scale.py                  # 1B-shaped, CPU (about 15 min)
    python benchmarks/bench_scale.py --device cuda    # 7B-shaped, one GPU
    python benchmarks/bench_scale.py --quick          # 4 blocks of 512: a smoke run
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import parser, start

HERE = Path(__file__).resolve().parent
SHAPES = {  # blocks, hidden, intermediate, heads, vocab, shard bytes
    "1b": (16, 2048, 5632, 16, 8192, 512 << 20),
    "7b": (32, 4096, 11008, 32, 8192, 2 << 30),
    "quick": (4, 512, 1408, 8, 1024, 8 << 20),
}


def make_checkpoint(directory: Path, shape: str, blocks: int) -> Path:
    """The checkpoint of ``shape`` with ``blocks`` blocks (cached: made once)."""
    import transformers  # the benchmark's own dependency

    from tnsurgery.io.shards import ShardWriter

    _, hidden, inter, heads, vocab, shard = SHAPES[shape]
    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp, shard)

    def matrix(out: int, inp: int) -> torch.Tensor:
        r = min(out, inp)
        s = (1.0 + torch.arange(r, dtype=torch.float32)) ** -0.5
        u = torch.randn(out, r, generator=g) / out**0.5
        v = torch.randn(inp, r, generator=g) / inp**0.5
        return ((u * s) @ v.T).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    writer.add(
        "model.embed_tokens.weight", (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16()
    )
    for i in range(blocks):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(p + f"self_attn.{name}.weight", matrix(hidden, hidden))
        writer.add(p + "mlp.gate_proj.weight", matrix(inter, hidden))
        writer.add(p + "mlp.up_proj.weight", matrix(inter, hidden))
        writer.add(p + "mlp.down_proj.weight", matrix(hidden, inter))
        writer.add(p + "input_layernorm.weight", ones(hidden))
        writer.add(p + "post_attention_layernorm.weight", ones(hidden))
        print(f"  generated block {i + 1}/{blocks}", flush=True)
    writer.add("model.norm.weight", ones(hidden))
    writer.add("lm_head.weight", (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16())
    writer.finish()
    tmp.rename(directory)
    return directory


def spec_of(shape: str, calibrated: bool, device: str) -> dict:
    """Every block Linear to 25 % of its parameters; with a calibration, block by block."""
    vocab = SHAPES[shape][4]
    spec = {
        "version": 1,
        "rules": [
            {"match": "model.layers.*.**", "types": ["Linear"], "transform": "factorize",
             "params": {"param_ratio": 0.25}},
        ],
    }  # fmt: skip
    if calibrated:
        samples, tokens = (128, 2048) if device.startswith("cuda") else (32, 128)
        if shape == "quick":
            samples, tokens = 8, 32
        spec["calibration"] = {
            "data": {"source": "random", "shape": [tokens], "vocab_size": vocab},
            "samples": samples, "batch_size": 8, "pipeline": "blocks",
        }  # fmt: skip
    return spec


def one(args) -> None:
    """One surgery in this process; prints its figures as JSON."""
    from tnsurgery import streaming

    torch.set_num_threads(args.threads)
    vocab = SHAPES[args.shape][4]
    x = {"input_ids": torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1))}
    spec = spec_of(args.shape, args.one == "calibrated", args.device)
    marks: list[int] = []  # anonymous memory as each block starts, and after the last

    def progress(i: int, total: int, what: str) -> None:
        marks.append(anon_bytes())

    t0 = time.perf_counter()
    result = streaming.apply_checkpoint(
        spec, Path(args.ckpt), Path(args.target), sample_input=x, device=args.device,
        progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    totals = result.plan.totals()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "pipeline": result.plan.pipeline,
                "output_error": result.plan.output_error,
                "params_before": totals["params_before"],
                "params_after": totals["params_after"],
                **{k: v for k, v in result.plan.streaming.items() if k.startswith("peak")},
                "shards_written": result.plan.streaming["shards_written"],
                # between blocks: from the end of the first block to the end of the last
                "growth_between_blocks_bytes": marks[-1] - marks[1] if len(marks) > 2 else 0,
            }
        )
    )


def anon_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(kind: str, ckpt: Path, args) -> dict:
    target = Path(tempfile.mkdtemp(prefix="bench-scale-")) / "out"
    cmd = [
        sys.executable, __file__, "--one", kind, "--ckpt", str(ckpt), "--target", str(target),
        "--shape", args.shape, "--device", args.device, "--threads", str(args.threads),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)


def copy_seconds(ckpt: Path) -> float:
    """Time to copy the checkpoint's weight files (the I/O floor)."""
    target = Path(tempfile.mkdtemp(prefix="bench-scale-copy-"))
    try:
        t0 = time.perf_counter()
        for f in sorted(ckpt.glob("*.safetensors")):
            shutil.copyfile(f, target / f.name)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    ap = parser(__doc__, "4 blocks of 512 (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu (1B-shaped) or cuda (7B-shaped)")
    ap.add_argument("--shape", choices=list(SHAPES), help=argparse_help())
    ap.add_argument("--one", choices=["data-free", "calibrated"], help=argparse_help())
    ap.add_argument("--ckpt", help=argparse_help())
    ap.add_argument("--target", help=argparse_help())
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    args.shape = args.shape or ("quick" if args.quick else "7b" if "cuda" in args.device else "1b")
    rec = start("bench_scale" + ("_cuda" if "cuda" in args.device else ""), args)
    blocks, hidden, inter, _, vocab, shard = SHAPES[args.shape]
    root = (rec.root / "bench_out" / "scale").resolve()
    full = make_checkpoint(root / f"{args.shape}-{blocks}", args.shape, blocks)
    half = make_checkpoint(root / f"{args.shape}-{blocks // 2}", args.shape, blocks // 2)
    size = sum(f.stat().st_size for f in full.glob("*.safetensors"))
    rec.note(
        f"A Llama-shaped checkpoint generated here: {blocks} blocks × [4 × {hidden}², "
        f"3 × {hidden}×{inter}], vocabulary {vocab}, bfloat16, trained-like spectra "
        f"(s_k ∝ (1+k)^-0.5), {size / 2**30:.2f} GiB in shards of {shard >> 20} MiB. Every "
        "block Linear factorized to 25 % of its parameters (param_ratio 0.25), each run in "
        f"its own process, on {args.device} with {args.threads} threads. Peak host memory: "
        "anonymous memory beyond the start (the shards' memory-mapped pages, the kernel's "
        "cache, are not counted; 'resident' counts them)."
    )
    t = rec.table(
        "runs",
        "Streamed surgery, end to end",
        "run | blocks | seconds | copy (I/O floor) s | peak host MiB | resident MiB | "
        "device MiB | shard MiB | growth between blocks MiB | output error",
    )
    floors = {full: copy_seconds(full), half: copy_seconds(half)}
    results = {}
    for kind, ckpt, n in (("data-free", full, blocks), ("calibrated", full, blocks),
                          ("calibrated", half, blocks // 2)):  # fmt: skip
        r = run_one(kind, ckpt, args)
        results[(kind, n)] = r
        device = r.get("peak_device_bytes")
        t.add(
            kind, n, round(r["seconds"], 1), round(floors[ckpt], 1),
            round(r["peak_host_bytes"] / 2**20), round(r["peak_rss_bytes"] / 2**20),
            "-" if device is None else round(device / 2**20), shard >> 20,
            round(r["growth_between_blocks_bytes"] / 2**20),
            round(r["output_error"], 4) if r["output_error"] is not None else "-",
        )  # fmt: skip
        print(f"  {kind} ({n} blocks): {r}", flush=True)
    free = results[("data-free", blocks)]
    limit = 600 if args.device == "cpu" else 30
    t.goal(
        f"data-free end to end under {limit} s",
        free["seconds"] < limit,
        f"{free['seconds']:.1f} s",
    )
    t.goal(
        "data-free peak host memory within 2 × one shard",
        free["peak_host_bytes"] <= 2 * shard,
        f"{free['peak_host_bytes'] / 2**20:.0f} MiB vs {2 * shard >> 20} MiB",
    )
    a, b = results[("calibrated", blocks)], results[("calibrated", blocks // 2)]
    t.goal(
        "calibrated peak memory independent of the number of blocks (within 25 %)",
        a["peak_host_bytes"] <= 1.25 * b["peak_host_bytes"],
        f"{blocks} blocks {a['peak_host_bytes'] / 2**20:.0f} MiB, "
        f"{blocks // 2} blocks {b['peak_host_bytes'] / 2**20:.0f} MiB",
    )
    t.goal(
        "calibrated memory flat from block to block (growth from the end of the first block "
        "to the end of the last under 5 % of the peak)",
        a["growth_between_blocks_bytes"] <= 0.05 * a["peak_host_bytes"],
        f"{a['growth_between_blocks_bytes'] / 2**20:+.0f} MiB over {blocks - 1} blocks",
    )
    rec.data["runs"] = {f"{k}-{n}": v for (k, n), v in results.items()}
    rec.finish(args.out)


def argparse_help() -> str:
    return "(internal: one run in its own process)"


if __name__ == "__main__":
    main()
