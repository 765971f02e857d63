"""Benchmark of the ``qat`` transform and of export (not part of the test suite).

    python benchmarks/bench_qat.py            # full run (about 2 minutes on 2 cores)
    python benchmarks/bench_qat.py --quick    # smoke check (under a minute)

A small CNN (conv 1->32, conv 32->64, max-pool, conv 64->64, Linear 1024->128,
Linear 128->10; 188k parameters) is trained on scikit-learn's digits (1797 8x8
images, a seeded stratified 70/30 split) in the benchmark itself. From that one
dense model, measured in one run:

1. tnsurgery: ``factorize`` (SVD, ``param_ratio`` 0.4) of conv2, conv3 and fc1, then
   ``qat`` on all five layers (each low-rank factor with its own per-channel
   quantizer) at 8, 4 and 2 bits (``--bits``); ``tucker`` of the two 64-channel
   convs + ``factorize`` of fc1 + ``qat`` 4 bits; ``qat`` alone on the dense
   layers. Each surgered model is fine-tuned for the same number of steps (same
   optimizer, learning rate and batch order as a float fine-tune of the dense
   model, the reference; observers frozen for the last 30 % of QAT steps), then
   exported by ``surgery.convert`` (integers packed to ``bits``) and saved by
   ``tnsurgery.save``. Test accuracy right after surgery (no training: for QAT,
   what post-training quantization gives), after the fine-tune (fake-quant model,
   eval mode), of the exported model and of the model loaded back from disk; the
   exported model's logits against the fake-quant model's; bytes on disk (the
   ``.safetensors`` file, split into tensor data and header, which embeds the
   manifest); wall time of surgery, fine-tune and export.
2. The same QAT fine-tune at the same bits with PyTorch's own eager-mode
   ``torch.ao.quantization`` (``prepare_qat`` with ``FakeQuantize`` on the same
   integer grid, per-channel symmetric weights): weight-only (activations left in
   float, as tnsurgery's ``qat`` by default; nothing in eager mode converts that),
   and the usual static recipe (QuantStub/DeQuantStub, conv and Linear fused with
   their ReLU, 8-bit activations) whose ``convert`` gives int8 modules that run
   and are saved; torchao's QAT (``QATConfig(IntxWeightOnlyConfig(...))``, Linear
   layers only) when torchao imports next to this torch (``pip install torchao
   --no-deps``); and, next to them, tnsurgery's ``qat`` on the same layers and
   settings (W-bit + 8-bit inputs; Linear layers only).

Training runs are timed while watching /proc/stat (``tnsurgery.bench.watch``): a run
during which other processes took more than 10 % of the cores is named in the stamp.
Everything is seeded; accuracies are on the 540 test images (one image is
0.185 %).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# This model's ops are tiny: with OpenMP's default active waiting, a second process
# busy on one of the two cores makes every parallel region wait for a descheduled
# thread, and a fine-tune 30-60x slower (measured); passive waiting costs ~15 % when
# the machine is quiet. Set before torch loads OpenMP; the environment can override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import accuracy as accuracy_on  # noqa: E402
from common import digits, n_params, parser, start  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

import tnsurgery  # noqa: E402
from tnsurgery import bench, surgery  # noqa: E402
from tnsurgery.quant import set_observers  # noqa: E402

LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2"]
FACTORIZED = ["conv2", "conv3", "fc1"]  # the first conv (9 weights per filter) and the
# classifier (10 outputs) stay whole: factorizing them saves little and costs much
LINEARS = ["fc1", "fc2"]
QUIET = [  # warnings of PyTorch's eager quantization (deprecated in this torch), said once
    r"(?s).*torch\.ao\.quantization is deprecated",
    r"(?s).*quantized tensor creation functions",
    r"(?s).*TypedStorage is deprecated",
    r"(?s).*reduce_range will be deprecated",
    r"(?s).*must run observer before calling calculate_qparams",
]


# ----------------------------------------------------------------------------- data, model


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int) -> Data:
    """scikit-learn's digits as (N, 1, 8, 8) images in [0, 1]; stratified 70/30."""
    xtr, xte, ytr, yte = digits(seed, images=True)
    return Data(xtr, ytr, xte, yte)


class DigitsCNN(nn.Module):
    """The benchmark's CNN: named layers, activations as modules (so PyTorch's eager
    quantization can fuse each conv/Linear with its ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.flatten(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(x)))


class WithStubs(nn.Module):
    """The CNN between QuantStub and DeQuantStub (PyTorch's static eager quantization)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.net, self.dequant = QuantStub(), net, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.net(self.quant(x)))


# ----------------------------------------------------------------------------- training


@dataclass
class Train:
    batch: int
    lr: float
    steps: int
    seed: int
    freeze_at: float = 0.7  # share of the steps after which QAT observers are frozen


def batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The same index stream for every model fine-tuned with the same seed."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch]
        pos += batch


@dataclass
class FitResult:
    seconds: float
    no_grad: list[str] = field(default_factory=list)  # parameters without a gradient


def fit(
    model: nn.Module,
    data: Data,
    cfg: Train,
    freeze: Callable[[nn.Module], None] | None = None,
    label: str = "",
) -> FitResult:
    """Adam on cross-entropy for ``cfg.steps`` steps; ``freeze`` (the observers) is called
    once ``cfg.freeze_at`` of the steps are done. Checks that every trainable
    parameter gets a gradient at the first step."""
    torch.manual_seed(cfg.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    freeze_step = int(cfg.steps * cfg.freeze_at) if freeze is not None else -1
    no_grad: list[str] = []
    with bench.watch(f"training: {label}") as w:
        for step, idx in enumerate(batches(len(data.y_train), cfg.batch, cfg.steps, cfg.seed)):
            if step == freeze_step:
                freeze(model)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                no_grad = [
                    n
                    for n, p in model.named_parameters()
                    if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
                ]
            opt.step()
    model.eval()
    return FitResult(w.seconds, no_grad)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def accuracy(model: nn.Module, data: Data) -> float:
    return accuracy_on(model, data.x_test, data.y_test)


# ----------------------------------------------------------------------------- bytes


@dataclass
class OnDisk:
    file: int  # bytes of the file
    tensors: int  # bytes of the tensor data in it
    fmt: str

    @property
    def overhead(self) -> int:
        return self.file - self.tensors


def safetensors_size(path: Path) -> OnDisk:
    """Size of a ``.safetensors`` file, split into tensor data and header (8-byte
    length + JSON header, which holds the ``__metadata__``: tnsurgery's manifest)."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return OnDisk(len(raw), len(raw) - 8 - header, "safetensors")


def tensor_nbytes(value: object) -> int:
    """Bytes held by the tensors in ``value`` (a state dict, a tuple of packed params,
    a quantized tensor or a tensor subclass, counted by its inner tensors)."""
    if isinstance(value, dict):
        return sum(tensor_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_nbytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        if hasattr(value, "__getstate__") and type(value).__name__.endswith("PackedParams"):
            return tensor_nbytes(value.__getstate__())
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(value, n)) for n in names)
    if value.is_quantized:
        n = value.numel() * value.element_size()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            n += tensor_nbytes(value.q_per_channel_scales())
            n += tensor_nbytes(value.q_per_channel_zero_points())
        else:
            n += 8 + 8  # a double scale and an int64 zero point
        return n
    return value.numel() * value.element_size()


def torch_save_size(state: dict, path: Path) -> OnDisk:
    """Size of ``torch.save(state)`` (PyTorch's and torchao's quantized tensors do not
    fit safetensors)."""
    torch.save(state, path)
    return OnDisk(path.stat().st_size, tensor_nbytes(state), "torch.save")


def save_dense(model: nn.Module, path: Path) -> OnDisk:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return safetensors_size(path)


def save_surgered(model: nn.Module, directory: Path) -> OnDisk:
    tnsurgery.save(model, directory)
    return safetensors_size(directory / "model.safetensors")


# ----------------------------------------------------------------------------- tnsurgery rows


def factorize_rule(ratio: float) -> dict:
    return {"match": FACTORIZED, "transform": "factorize", "params": {"param_ratio": ratio}}


def qat_rule(bits: int, layers: list[str], activations: int | None = None) -> dict:
    return {
        "match": layers,
        "transform": "qat",
        "params": {
            "bits": bits,
            "scheme": "symmetric",
            "granularity": "per_channel",
            "observer": "minmax",
            "learn_scale": False,
            "activations": activations,
        },
    }


@dataclass
class Row:
    name: str
    params: int
    acc_surgery: float | None = None  # right after surgery / prepare, before any training
    acc_tuned: float | None = None  # after the fine-tune (fake-quant model, eval mode)
    acc_export: float | None = None  # exported / converted model
    acc_loaded: float | None = None  # loaded back from disk
    disk: OnDisk | None = None
    surgery_s: float | None = None
    tune_s: float | None = None
    export_s: float | None = None
    layers: str = ""
    bits: str = ""
    export_diff: float | None = None  # max |logit difference|, exported vs fake-quant
    export_same: int | None = None  # test images with the same prediction
    notes: list[str] = field(default_factory=list)


def tnsurgery_row(
    name: str,
    dense: nn.Module,
    spec: dict,
    data: Data,
    cfg: Train,
    out: Path,
    *,
    quantized: bool,
    layers: str = "",
    bits: str = "",
) -> tuple[Row, nn.Module]:
    sample = data.x_train[:64]
    surgery_s, model = bench.time_once(lambda: surgery.apply(dense, spec, sample))
    row = Row(name, n_params(model), acc_surgery=accuracy(model, data), surgery_s=surgery_s)
    row.layers, row.bits = layers, bits
    if cfg.steps:
        freeze = (lambda m: set_observers(m, False)) if quantized else None
        res = fit(model, data, cfg, freeze=freeze, label=name)
        row.tune_s, row.acc_tuned = res.seconds, accuracy(model, data)
        if res.no_grad:
            row.notes.append(f"NO GRADIENT at step 1: {', '.join(res.no_grad)}")
    final = model
    if quantized:
        row.export_s, final = bench.time_once(lambda: surgery.convert(model, sample))
        row.acc_export = accuracy(final, data)
        ref, got = predict(model, data.x_test), predict(final, data.x_test)
        row.export_diff = float((ref - got).abs().max())
        row.export_same = int((ref.argmax(1) == got.argmax(1)).sum())
        err = (surgery.get_manifest(final) or {}).get("output_error")
        if row.export_diff > 0 or err:
            row.notes.append(
                f"exported != fake-quant: max |logit diff| {row.export_diff:.2e}, manifest "
                f"output_error {err}"
            )
    row.disk = save_surgered(final, out)
    loaded = tnsurgery.load(out, DigitsCNN())
    row.acc_loaded = accuracy(loaded, data)
    if quantized:
        manifest = surgery.get_manifest(final) or {}
        after = manifest.get("model_bytes_after")
        if after is not None and after != row.disk.tensors:
            row.notes.append(
                f"manifest model_bytes_after {after} != tensor data in the file {row.disk.tensors}"
            )
    return row, final


# ----------------------------------------------------------------------------- PyTorch eager


def eager_qconfig(bits: int, activations: bool):
    """Per-channel symmetric weights on tnsurgery's grid ([-(2^(b-1)-1), 2^(b-1)-1]),
    PyTorch's default weight observer (moving-average per-channel min/max); 8-bit
    activations from PyTorch's default QAT qconfig for the x86 engine, or none."""
    import torch.ao.quantization as tq

    qmax = 2 ** (bits - 1) - 1
    weight = tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-qmax,
        quant_max=qmax,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    activation = tq.get_default_qat_qconfig("x86").activation if activations else nn.Identity
    return tq.QConfig(activation=activation, weight=weight)


def eager_freeze(model: nn.Module) -> None:
    import torch.ao.quantization as tq

    model.apply(tq.disable_observer)


def eager_untrained_accuracy(model: nn.Module, data: Data, batch: int) -> float:
    """Accuracy before any training: the observers see one training batch (as at the first
    fine-tune step), then are frozen while the test set runs (eager FakeQuantize observes in
    eval mode too), and enabled again."""
    import torch.ao.quantization as tq

    with torch.no_grad():
        model.train()(data.x_train[:batch])
    eager_freeze(model)
    acc = accuracy(model, data)
    model.apply(tq.enable_observer)
    return acc


def pytorch_weight_only(dense: nn.Module, bits: int, data: Data, cfg: Train) -> Row:
    import torch.ao.quantization as tq

    model = copy.deepcopy(dense)
    model.qconfig = eager_qconfig(bits, activations=False)
    for name in ("relu1", "relu2", "pool", "relu3", "flatten", "relu4"):
        getattr(model, name).qconfig = None
    surgery_s, model = bench.time_once(lambda: tq.prepare_qat(model.train()))
    row = Row(
        f"PyTorch eager QAT, weight-only W{bits}",
        n_params(model),
        acc_surgery=eager_untrained_accuracy(model, data, cfg.batch),
        surgery_s=surgery_s,
        layers="all 5",
        bits=f"W{bits}",
    )
    res = fit(model, data, cfg, freeze=eager_freeze, label=row.name)
    row.tune_s, row.acc_tuned = res.seconds, accuracy(model, data)
    row.notes.append(
        "no weight-only export in eager mode: convert() makes static int8 modules, which "
        "quantize activations too, and quantize_dynamic (activations quantized on the fly) "
        "maps Linear/RNN/Embedding only"
    )
    return row


STATIC_FUSE = [["conv1", "relu1"], ["conv2", "relu2"], ["conv3", "relu3"], ["fc1", "relu4"]]


def static_prepared(net: nn.Module, bits: int) -> nn.Module:
    """``net`` fused, between stubs, prepared for static QAT (weights ``bits``, inputs 8)."""
    import torch.ao.quantization as tq

    model = WithStubs(tq.fuse_modules_qat(net.train(), STATIC_FUSE))
    model.qconfig = eager_qconfig(bits, activations=True)
    return tq.prepare_qat(model.train())


def pytorch_static(dense: nn.Module, bits: int, data: Data, cfg: Train, out: Path) -> Row:
    import torch.ao.quantization as tq

    torch.backends.quantized.engine = "x86"
    surgery_s, model = bench.time_once(lambda: static_prepared(copy.deepcopy(dense), bits))
    row = Row(
        f"PyTorch eager QAT, static W{bits}A8",
        n_params(model),
        acc_surgery=eager_untrained_accuracy(model, data, cfg.batch),
        surgery_s=surgery_s,
        layers="all 5",
        bits=f"W{bits}A8",
    )
    res = fit(model, data, cfg, freeze=eager_freeze, label=row.name)
    row.tune_s, row.acc_tuned = res.seconds, accuracy(model, data)
    row.export_s, q = bench.time_once(lambda: tq.convert(copy.deepcopy(model).eval()))
    row.acc_export = accuracy(q, data)
    row.disk = torch_save_size(q.state_dict(), out)
    reloaded = tq.convert(static_prepared(DigitsCNN(), bits).eval())
    reloaded.load_state_dict(torch.load(out, weights_only=False))
    row.acc_loaded = accuracy(reloaded, data)
    if bits < 8:
        row.notes.append(
            f"int8 storage: no int{bits} tensor in eager mode (values in "
            f"[-{2 ** (bits - 1) - 1}, {2 ** (bits - 1) - 1}])"
        )
    return row


# ----------------------------------------------------------------------------- torchao


def import_torchao() -> tuple[object | None, str]:
    """torchao's QAT API, or why it is not available."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA kernels fail to load
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # its Enum registrations
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerAxis
            from torchao.quantization.qat import QATConfig
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot compare"
        return None, f"{type(exc).__name__}: {exc}"
    api = {
        "quantize_": quantize_,
        "IntxWeightOnlyConfig": IntxWeightOnlyConfig,
        "PerAxis": PerAxis,
        "QATConfig": QATConfig,
    }
    return api, f"torchao {torchao.__version__}"


def torchao_row(api: dict, dense: nn.Module, bits: int, data: Data, cfg: Train, out: Path) -> Row:
    dtype = getattr(torch, f"int{bits}")
    base = api["IntxWeightOnlyConfig"](weight_dtype=dtype, granularity=api["PerAxis"](0))
    model = copy.deepcopy(dense)
    surgery_s, _ = bench.time_once(
        lambda: api["quantize_"](model, api["QATConfig"](base, step="prepare"))
    )
    row = Row(
        f"torchao QAT, IntxWeightOnly int{bits}",
        n_params(model),
        acc_surgery=accuracy(model, data),
        surgery_s=surgery_s,
        layers="fc1, fc2",
        bits=f"W{bits}",
    )
    res = fit(model, data, cfg, label=row.name)  # dynamic weight quantizers: nothing to freeze
    row.tune_s, row.acc_tuned = res.seconds, accuracy(model, data)
    row.export_s, _ = bench.time_once(
        lambda: api["quantize_"](model, api["QATConfig"](base, step="convert"))
    )
    row.acc_export = accuracy(model, data)
    row.disk = torch_save_size(model.state_dict(), out)
    fresh = DigitsCNN()  # the same structure, other weights, then the file's
    api["quantize_"](fresh, api["QATConfig"](base, step="prepare"))
    api["quantize_"](fresh, api["QATConfig"](base, step="convert"))
    fresh.load_state_dict(torch.load(out, weights_only=False), assign=True)
    row.acc_loaded = accuracy(fresh, data)
    row.notes.append(
        "Linear only (QATConfig swaps nn.Linear/nn.Embedding): the convs stay float32"
        + (
            f"; int{bits} stored unpacked in int8, grid "
            f"[{-(2 ** (bits - 1))}, {2 ** (bits - 1) - 1}]"
            if bits < 8
            else ""
        )
    )
    return row


# ----------------------------------------------------------------------------- report


def spec_rows(ratio: float, bits_list: list[int]) -> list[tuple[str, dict, bool]]:
    """The tnsurgery rows: (name, spec, quantized)."""
    fact = [factorize_rule(ratio)]
    tucker = [
        {"match": ["conv2", "conv3"], "transform": "tucker", "params": {"param_ratio": ratio}},
        {"match": "fc1", "transform": "factorize", "params": {"param_ratio": ratio}},
    ]
    out = [(f"factorized (param_ratio {ratio:g})", {"rules": fact}, False)]
    out += [
        (f"factorized {ratio:g} + QAT {b} bits", {"rules": [*fact, qat_rule(b, LAYERS)]}, True)
        for b in bits_list
    ]
    out.append(
        (
            f"tucker {ratio:g} (convs) + factorized (fc1) + QAT 4 bits",
            {"rules": [*tucker, qat_rule(4, LAYERS)]},
            True,
        )
    )
    out += [(f"dense + QAT {b} bits", {"rules": [qat_rule(b, LAYERS)]}, True) for b in bits_list]
    return out


def comparisons(
    dense: nn.Module,
    bits: int,
    data: Data,
    tune: Train,
    out: Path,
    same: Row,
    torchao_api: dict | None,
) -> tuple[list[Row], str]:
    """QAT at ``bits`` with each implementation; ``same`` is tnsurgery's weight-only
    run on all layers (a row of the first table)."""
    rows = [
        dataclasses.replace(
            same,
            name=f"tnsurgery qat W{bits}",
            layers="all 5",
            bits=f"W{bits}",
            notes=[],
            export_diff=None,  # checked once, in the first table
            export_same=None,
        )
    ]
    for name, rule, layers, label in [
        (f"tnsurgery qat W{bits}A8 (input symmetric)", qat_rule(bits, LAYERS, 8), "all 5", "A8"),
        (f"tnsurgery qat W{bits}, Linear only", qat_rule(bits, LINEARS), "fc1, fc2", ""),
    ]:
        row, _ = tnsurgery_row(
            name,
            dense,
            {"rules": [rule]},
            data,
            tune,
            out / f"cmp_w{bits}_{len(rows)}",
            quantized=True,
            layers=layers,
            bits=f"W{bits}{label}",
        )
        rows.append(row)
    rows.append(pytorch_weight_only(dense, bits, data, tune))
    rows.append(pytorch_static(dense, bits, data, tune, out / f"pt_static_w{bits}.pt"))
    status = ""
    if torchao_api is not None:
        try:
            rows.append(torchao_row(torchao_api, dense, bits, data, tune, out / f"ao_w{bits}.pt"))
        except Exception as exc:  # noqa: BLE001 - report and go on
            status = f"int{bits} failed: {type(exc).__name__}: {exc}"
    return rows, status


def pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def final_acc(r: Row) -> float:
    """The accuracy of what the row ships: exported if it was, else after the fine-tune."""
    return r.acc_export if r.acc_export is not None else r.acc_tuned


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "reduced run (< 1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, help="dense training epochs (default 20, quick 6)")
    ap.add_argument("--steps", type=int, help="fine-tune steps (default 200, quick 40)")
    ap.add_argument("--param-ratio", type=float, default=0.4, help="factorize param_ratio")
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tune learning rate")
    ap.add_argument("--bits", default="8,4,2", help="weight bits of the QAT rows")
    ap.add_argument("--keep", type=Path, help="keep the saved models in this directory")
    args = ap.parse_args(argv)
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    epochs = args.epochs or (6 if args.quick else 20)
    steps = args.steps if args.steps is not None else (40 if args.quick else 200)
    bits_list = [int(b) for b in args.bits.split(",")]
    rec = start("bench_qat", args, libraries=("torchao", "safetensors"))
    data = load_data(args.seed)
    batch = 64
    torchao_api, torchao_status = import_torchao()
    rec.note(
        f"digits {len(data.y_train)} train / {len(data.y_test)} test images; dense: Adam lr "
        f"1e-3, {epochs} epochs of batch {batch}; every fine-tune: Adam lr {args.lr:g}, "
        f"{steps} steps of batch {batch}, the same batch order; QAT observers frozen after "
        f"{int(0.7 * steps)} steps. Accuracies in % of the test images."
    )

    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            out = args.keep
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_qat_")))

        # ---------------------------------------------------------------- dense
        torch.manual_seed(args.seed)
        dense = DigitsCNN()
        train_cfg = Train(batch, 1e-3, epochs * (len(data.y_train) // batch), args.seed)
        train_s = fit(dense, data, train_cfg, label="dense training").seconds
        tune = Train(batch, args.lr, steps, args.seed + 1)
        dense_row = Row("dense float32", n_params(dense), acc_tuned=accuracy(dense, data))
        dense_row.disk, dense_row.tune_s = save_dense(dense, out / "dense.safetensors"), train_s
        dense_row.notes.append(f"FT s: its training from scratch, {train_cfg.steps} steps")
        dense_tuned = copy.deepcopy(dense)
        res = fit(dense_tuned, data, tune, label="dense fine-tune")
        tuned_row = Row(
            f"dense float32 + {steps} more float steps",
            n_params(dense_tuned),
            acc_surgery=dense_row.acc_tuned,
            acc_tuned=accuracy(dense_tuned, data),
            tune_s=res.seconds,
        )
        tuned_row.notes.append("the fine-tune alone, without surgery: the reference for deltas")
        print("  dense model trained", file=sys.stderr)

        # ---------------------------------------------------------------- tnsurgery
        rows: list[Row] = [dense_row, tuned_row]
        weight_only: dict[int, Row] = {}
        for i, (name, spec, quantized) in enumerate(spec_rows(args.param_ratio, bits_list)):
            row, _ = tnsurgery_row(
                name, dense, spec, data, tune, out / f"ts{i}", quantized=quantized
            )
            rows.append(row)
            if name.startswith("dense + QAT"):
                weight_only[int(name.split()[3])] = row
            print(f"  {name}", file=sys.stderr)

        # ---------------------------------------------------------------- comparisons
        cmp_rows: list[Row] = []
        failures = []
        for bits in bits_list:
            got, status = comparisons(dense, bits, data, tune, out, weight_only[bits], torchao_api)
            cmp_rows += got
            if status:
                failures.append(status)
            print(f"  comparisons at {bits} bits", file=sys.stderr)
    ours_table(rec, rows, dense_row.disk, steps)
    compared_table(rec, cmp_rows, steps, torchao_api, torchao_status, failures)
    checks(rec, rows, cmp_rows, len(data.y_test))
    summary(rec, rows, cmp_rows, dense_row, tuned_row)
    rec.finish(args.out)
    return 0


def ours_table(rec: bench.Record, rows: list[Row], dense: OnDisk, steps: int) -> None:
    t = rec.table(
        "tnsurgery",
        "tnsurgery: accuracy, size on disk, time",
        (
            f"model | params | acc no FT | acc after FT ({steps} steps) | acc exported |"
            f" acc loaded | file bytes | tensor bytes | header+meta | smaller: file x |"
            f" smaller: tensors x | surgery s | FT s | export s"
        ),
        formats={"*": ".2f"},
    )
    for r in rows:
        d = r.disk
        sizes = [None] * 5
        if d is not None:
            sizes = [d.file, d.tensors, d.overhead, dense.file / d.file, dense.tensors / d.tensors]
        t.add(
            r.name,
            r.params,
            pct(r.acc_surgery),
            pct(r.acc_tuned),
            pct(r.acc_export),
            pct(r.acc_loaded),
            *sizes,
            r.surgery_s,
            r.tune_s,
            r.export_s,
        )
    t.note(
        "acc no FT: right after surgery, no training (for QAT rows: post-training "
        "quantization with min/max scales); acc after FT: the surgered model (fake "
        "quantization) after the fine-tune, in eval mode; acc exported: after "
        "surgery.convert (integers packed to the bits); acc loaded: tnsurgery.load of the "
        "saved manifest.json + model.safetensors into a fresh model."
    )
    t.note(
        "file bytes: model.safetensors written by tnsurgery.save (dense: "
        "safetensors.torch.save_file of the state dict); tensor bytes: its tensor data; "
        "header+meta: the rest, its JSON header, which embeds the whole manifest."
    )


def compared_table(rec, cmp_rows, steps, torchao_api, torchao_status, failures) -> None:
    t = rec.table(
        "compared",
        f"QAT at the same bits: tnsurgery vs PyTorch eager vs torchao ({steps} steps)",
        (
            "method | layers | bits | acc no FT | acc after FT | acc converted | acc loaded |"
            " file bytes | tensor bytes | format | FT s"
        ),
        formats={"*": ".2f"},
    )
    for r in cmp_rows:
        t.add(
            r.name,
            r.layers,
            r.bits,
            pct(r.acc_surgery),
            pct(r.acc_tuned),
            pct(r.acc_export),
            pct(r.acc_loaded),
            r.disk.file if r.disk else None,
            r.disk.tensors if r.disk else None,
            r.disk.fmt if r.disk else None,
            r.tune_s,
        )
    t.note(
        "tnsurgery qat: per-channel symmetric weights on [-(2^(b-1)-1), 2^(b-1)-1], "
        "min/max scales; with A8 also each layer's input, per tensor, symmetric (signed: "
        "half the grid unused after a ReLU)."
    )
    t.note(
        "PyTorch eager (torch.ao.quantization, deprecated in this torch): prepare_qat "
        "with FakeQuantize on the same weight grid (MovingAveragePerChannelMinMaxObserver); "
        "weight-only: activation=Identity, no convert possible; static: QuantStub/DeQuantStub, "
        "conv/Linear fused with ReLU, 8-bit activations from the x86 default QAT qconfig "
        "(reduce_range), convert() to x86 int8 modules, saved with torch.save; acc no FT: "
        "observers calibrated on one training batch."
    )
    if torchao_api is not None:
        t.note(
            f"torchao ({torchao_status}): quantize_(model, QATConfig(IntxWeightOnlyConfig("
            "weight_dtype=int<b>, granularity=PerAxis(0)), step='prepare'/'convert')): "
            "Linear layers only, the convs stay float32; fake quantizers recompute scales "
            "every step; converted weights are IntxUnpackedToInt8Tensor (one byte per "
            "value at any bits), saved with torch.save."
            + (f" Failed: {'; '.join(failures)}" if failures else "")
        )
    else:
        t.note(f"torchao: not compared ({torchao_status}); pip install torchao --no-deps")


def checks(rec: bench.Record, rows: list[Row], cmp_rows: list[Row], n_test: int) -> None:
    t = rec.table("checks", "checks and notes", [])
    checked = [r for r in [*rows, *cmp_rows] if r.export_diff is not None]
    if checked:
        t.note(
            f"exported (surgery.convert) vs fake-quant model, {len(checked)} tnsurgery QAT "
            f"runs: max |logit difference| {max(r.export_diff for r in checked):.2e}, same "
            f"prediction on at least {min(r.export_same for r in checked)}/{n_test} test images"
        )
    notes: dict[str, list[str]] = {}
    for r in [*rows, *cmp_rows]:
        for note in r.notes:
            notes.setdefault(note, []).append(r.name)
    for note, names in notes.items():
        t.note(f"{'; '.join(names)}: {note}")


def summary(rec, rows: list[Row], cmp_rows: list[Row], dense_row: Row, tuned_row: Row) -> None:
    t = rec.table("summary", "summary", [])
    d = dense_row
    for r in rows[2:]:
        acc = final_acc(r)
        t.note(
            f"{r.name}: {d.disk.file / r.disk.file:.1f}x smaller file than dense "
            f"({d.disk.tensors / r.disk.tensors:.1f}x in tensor bytes, header+meta "
            f"{100 * r.disk.overhead / r.disk.file:.0f} % of the file); accuracy "
            f"{100 * acc:.2f} % ({100 * (acc - d.acc_tuned):+.2f} points vs dense, "
            f"{100 * (acc - tuned_row.acc_tuned):+.2f} vs dense fine-tuned alike; before "
            f"fine-tuning {100 * r.acc_surgery:.2f} %)"
        )
    by_bits: dict[str, list[Row]] = {}
    for r in cmp_rows:
        by_bits.setdefault(r.bits.split("A")[0], []).append(r)
    for bits, group in by_bits.items():
        parts = [
            f"{r.name} {100 * final_acc(r):.2f} %"
            + (f" ({r.disk.file} B {r.disk.fmt})" if r.disk else " (no file)")
            for r in group
        ]
        t.note(f"{bits} after QAT: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
