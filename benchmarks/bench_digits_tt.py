"""A digits classifier compressed ~10x with ``tt``, then recovered by training (issue 6).

An MLP (64 -> 512 -> 512 -> 10) trained here on scikit-learn's digits; its two
big Linear layers become TT layers holding about a tenth of the model's
parameters; the spec's ``training`` section then recovers accuracy:
distillation from the original (with the labels mixed in by ``alpha``), and,
for comparison, label-free distillation and plain fine-tuning.

    python benchmarks/bench_digits_tt.py [--steps 400]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from tnsurgery import surgery


def data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y.numpy())
    return xtr, xte, ytr, yte


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ranks", type=int, nargs="+", default=[14, 6], help="TT ranks to try")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    xtr, xte, ytr, yte = data()
    model = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # epochs
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    dense_params = sum(p.numel() for p in model.parameters())
    print(
        f"# bench_digits_tt: digits {len(xtr)} train / {len(xte)} test, "
        f"{platform.processor() or platform.machine()}, 2 threads, torch {torch.__version__}\n"
    )
    print("| model | params | x smaller | test accuracy % | training s |")
    print("|---|---|---|---|---|")
    print(f"| dense MLP | {dense_params} | 1.0 | {accuracy(model, xte, yte):.2f} | - |")
    for rank in args.ranks:
        rules = [{"match": "[02]", "transform": "tt", "params": {"ranks": rank, "d": 3}}]
        run(model, rules, dense_params, xtr, ytr, xte, yte, args.steps, rank)


def run(model, rules, dense_params, xtr, ytr, xte, yte, steps, rank) -> None:
    small = surgery.apply(model, {"rules": rules})
    params = sum(p.numel() for p in small.parameters())
    ratio = dense_params / params
    label = f"tt ranks {rank}"
    print(
        f"| {label}, no training | {params} | {ratio:.1f} | {accuracy(small, xte, yte):.2f} | 0 |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((xtr, ytr), Path(tmp) / "train.pt")
        torch.save(xtr, Path(tmp) / "unlabeled.pt")
        labelled = {"source": "tensors", "path": str(Path(tmp) / "train.pt")}
        unlabeled = {"source": "tensors", "path": str(Path(tmp) / "unlabeled.pt")}
        recipes = {
            "+ distill (labels mixed, alpha 0.5)": {
                "mode": "distill",
                "data": labelled,
                "labels": -1,
            },
            "+ label-free distill": {"mode": "distill", "data": unlabeled},
            "+ finetune (labels only)": {"mode": "finetune", "data": labelled, "labels": -1},
        }
        for name, training in recipes.items():
            student = copy.deepcopy(small)
            t0 = time.perf_counter()
            surgery.train(
                student,
                {**training, "steps": steps, "lr": 3e-3, "batch_size": 64, "warmup_steps": 20},
                model,
            )
            seconds = time.perf_counter() - t0
            print(
                f"| {label} {name} | {params} | {ratio:.1f} | {accuracy(student, xte, yte):.2f} "
                f"| {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
