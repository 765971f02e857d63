"""Run every benchmark, one after another, then regenerate docs/benchmarks.md from them.

    python benchmarks/run_all.py                  # all in full (about an hour on 2 cores),
                                                  # then python -m tnsurgery.bench render
    python benchmarks/run_all.py --only bench_tensor bench_qat    # some of them
    python benchmarks/run_all.py --quick --docs /tmp/benchmarks.md   # smoke run of all

Each benchmark writes its record to ``bench_out/NAME.json`` (``NAME-quick.json`` with
``--quick``); the generated sections of the docs are then rewritten from the records
of the benchmarks that succeeded. A quick run renders only into a ``--docs`` file
named explicitly. Figures in the docs should come from committed code: the run warns
when ``tnsurgery/`` or ``benchmarks/`` have uncommitted changes (the stamps say so too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tnsurgery import bench

HERE = Path(__file__).resolve().parent
RUNS = [  # record name, script, its arguments, minutes of a full run on the 2-core machine
    ("bench_factorize", "bench_factorize.py", [], 7),
    ("bench_factorize_explore", "bench_factorize.py", ["--explore"], 25),
    ("bench_budget", "bench_budget.py", [], 5),
    ("bench_tensor", "bench_tensor.py", [], 3),
    ("bench_qat", "bench_qat.py", [], 2),
    ("bench_recover", "bench_recover.py", [], 15),
    ("bench_digits_tt", "bench_digits_tt.py", [], 1),
    ("bench_defaults", "bench_defaults.py", [], 20),
    ("bench_recipes", "bench_recipes.py", [], 5),
    ("bench_perplexity", "bench_perplexity.py", [], 13),
    ("bench_tokens", "bench_tokens.py", [], 3),
    ("bench_batched", "bench_batched.py", [], 2),
    ("bench_scale", "bench_scale.py", [], 25),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [name for name, *_ in RUNS]
    ap.add_argument("--only", nargs="+", choices=names, help="run these benchmarks only")
    ap.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    ap.add_argument("--no-render", action="store_true", help="run, but leave the docs alone")
    ap.add_argument("--docs", help="the markdown file to render into (default: the docs)")
    args = ap.parse_args(argv)
    root = bench.repo_root(HERE) or HERE.parent
    if bench.repo_root(HERE) is not None:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tnsurgery", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            print("warning: uncommitted changes in tnsurgery/ or benchmarks/:\n" + dirty)
    selected = [r for r in RUNS if args.only is None or r[0] in args.only]
    if not args.quick:
        total = sum(r[3] for r in selected)
        print(f"{len(selected)} benchmark(s), about {total} minutes on a quiet 2-core machine")
    written, failed = [], []
    for name, script, extra, _ in selected:
        out = root / bench.OUT_DIR / f"{name}{'-quick' if args.quick else ''}.json"  # its default
        cmd = [sys.executable, str(HERE / script), *extra, *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=root).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        (written if rc == 0 else failed).append(out if rc == 0 else name)
    rc = 0
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        rc = 1
    if written and not args.no_render and (args.docs or not args.quick):
        docs = args.docs or str(root / bench.DOCS)
        rc = bench.main(["render", *map(str, written), "--docs", docs]) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
