"""A digits classifier compressed ~10x with ``tt``, then recovered by training (issue 6).

An MLP (64 -> 512 -> 512 -> 10) trained here on scikit-learn's digits; its two
big Linear layers become TT layers holding about a tenth of the model's
parameters; the spec's ``training`` section then recovers accuracy:
distillation from the original (with the labels mixed in by ``alpha``), and,
for comparison, label-free distillation and plain fine-tuning.

    python benchmarks/bench_digits_tt.py [--steps 400] [--ranks 14 6]   # about 20 s
    python benchmarks/bench_digits_tt.py --quick                        # 5 epochs, 40 steps
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from common import accuracy, digits, n_params, parser, start
from torch import nn

from tnsurgery import bench, surgery

RECIPES = {
    "+ distill (labels mixed, alpha 0.5)": {"mode": "distill", "data": "labelled", "labels": -1},
    "+ label-free distill": {"mode": "distill", "data": "unlabeled"},
    "+ finetune (labels only)": {"mode": "finetune", "data": "labelled", "labels": -1},
}


def train_dense(xtr: torch.Tensor, ytr: torch.Tensor, epochs: int) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return fit(model, xtr, ytr, epochs)


def fit(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int) -> nn.Module:
    """``model`` trained on the labels (Adam lr 1e-3, batches of 64 in a seeded order),
    put in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "smoke check: 5 dense epochs, 40 steps, rank 14 only")
    ap.add_argument("--steps", type=int, help="training steps (400; quick 40)")
    ap.add_argument("--ranks", type=int, nargs="+", help="TT ranks to try (14 6; quick 14)")
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 400)
    ranks = args.ranks or ([14] if args.quick else [14, 6])
    rec = start("bench_digits_tt", args)
    xtr, xte, ytr, yte = digits(0)
    model = train_dense(xtr, ytr, 5 if args.quick else 30)
    dense_params = n_params(model)
    t = rec.table(
        "digits_tt",
        f"digits MLP 64-512-512-10 ({len(xtr)} train / {len(xte)} test images), its two big "
        f"Linears as TT (d=3); {steps} training steps",
        ["model", "params", "x smaller", "test accuracy %", "training s"],
        formats={"x smaller": ".1f", "test accuracy %": ".2f", "training s": ".1f"},
    )
    t.add("dense MLP", dense_params, 1.0, 100 * accuracy(model, xte, yte), None)
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((xtr, ytr), Path(tmp) / "train.pt")
        torch.save(xtr, Path(tmp) / "unlabeled.pt")
        data = {
            "labelled": {"source": "tensors", "path": str(Path(tmp) / "train.pt")},
            "unlabeled": {"source": "tensors", "path": str(Path(tmp) / "unlabeled.pt")},
        }
        for rank in ranks:
            rules = [{"match": "[02]", "transform": "tt", "params": {"ranks": rank, "d": 3}}]
            small = surgery.apply(model, {"rules": rules})
            params = n_params(small)
            label = f"tt ranks {rank}"
            ratio = dense_params / params
            t.add(f"{label}, no training", params, ratio, 100 * accuracy(small, xte, yte), 0.0)
            for name, recipe in RECIPES.items():
                student = copy.deepcopy(small)
                training = {
                    **recipe,
                    "data": data[recipe["data"]],
                    "steps": steps,
                    "lr": 3e-3,
                    "batch_size": 64,
                    "warmup_steps": min(20, steps // 2),
                }
                secs, _ = bench.time_once(
                    lambda s=student, tr=training: surgery.train(s, tr, model), f"{label} {name}"
                )
                acc = 100 * accuracy(student, xte, yte)
                best[rank] = max(best.get(rank, 0.0), acc)
                t.add(f"{label} {name}", params, ratio, acc, secs)
            dense_acc = 100 * accuracy(model, xte, yte)
            t.note(
                f"{label}: {ratio:.1f}x smaller; best after training {best[rank]:.2f} % vs "
                f"dense {dense_acc:.2f} % ({best[rank] - dense_acc:+.2f} points)"
            )
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
