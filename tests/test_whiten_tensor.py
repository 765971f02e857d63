"""Data-aware (whitened) ``tt`` and ``tucker`` on Linear layers.

References are computed here independently: the output error on the data straight
from the layers' forwards, the optimal rank-r output error of a single unfolding from
``torch.linalg.svdvals`` of the weight times a square root of the second moment, and
the Kronecker factors from a loop over index pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tnsurgery import surgery
from tnsurgery.decompositions.whitening import kronecker_factors, kronecker_whitening
from tnsurgery.stats import InputStats
from tnsurgery.transform import Context
from tnsurgery.transforms import tt, tucker

N_IN, N_OUT, ROWS = 84, 120, 1500
TT_3 = {"ranks": [6, 6], "in_factors": [3, 4, 7], "out_factors": [4, 6, 5]}
TT_2 = {"rank": 8, "in_factors": [12, 7], "out_factors": [12, 10]}
TUCKER_2 = {"ranks": [0.5, 0.5], "in_factors": [12, 7], "out_factors": [12, 10]}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kron_data(rows: int = ROWS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose second moment ``XᵀX/rows`` is exactly ``A Aᵀ ⊗ B Bᵀ`` (12 x 7 modes),
    and that second moment."""
    g = gen(seed)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 12)
    b = torch.randn(7, 7, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 7)
    # orthonormal columns, scaled: the rows' second moment is exactly the identity
    z = torch.linalg.qr(torch.randn(rows, N_IN, generator=g, dtype=torch.float64)).Q
    m = torch.kron(a, b)
    return z * math.sqrt(rows) @ m.mT, m @ m.mT


def correlated_data(rows: int = ROWS, seed: int = 2) -> torch.Tensor:
    """``x = z @ M``: a few input features dominate (30x, as outlier features of
    activations do), all are correlated by a random mixing; not Kronecker-structured."""
    g = gen(seed)
    scale = torch.ones(N_IN)
    scale[torch.randperm(N_IN, generator=g)[:4]] = 30.0
    mix = torch.eye(N_IN) + 0.05 * torch.randn(N_IN, N_IN, generator=g)
    return torch.randn(rows, N_IN, generator=g) @ (mix * scale).mT


def ctx_for(x: torch.Tensor, damping: float = 0.0, **extras) -> Context:
    x = x.double()
    stats = InputStats(x.mT @ x, x.shape[0])
    return Context(name="layer", input_stats=stats, damping=damping, **extras)


def linear(n_in: int = N_IN, n_out: int = N_OUT, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def out_err(layer: nn.Module, lin: nn.Linear, x: torch.Tensor) -> float:
    """Measured ``‖(Ŵ − W) X‖ / ‖W X‖`` (the bias is kept exactly: left out)."""
    with torch.no_grad():
        x = x.to(lin.weight.dtype)
        ref = (x @ lin.weight.mT).double()
        got = (layer(x) - lin.bias).double() if lin.bias is not None else layer(x).double()
    return float((got - ref).norm() / ref.norm())


def weights(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def plan(kind: str, lin: nn.Linear, ctx: Context, **params):
    mod, model = (tt, tt.TTParams) if kind == "tt" else (tucker, tucker.TuckerParams)
    return mod.plan(lin, model(**params), ctx)


# ------------------------------------------------------------- Kronecker factors


def test_kronecker_factors_are_partial_traces_and_exact_on_kronecker_matrices():
    g = gen(0)
    sizes = [3, 4, 2]
    mats = [torch.randn(n, n, generator=g, dtype=torch.float64) for n in sizes]
    parts = [m @ m.mT + 0.1 * torch.eye(len(m), dtype=torch.float64) for m in mats]
    c = torch.kron(torch.kron(parts[0], parts[1]), parts[2])
    factors = kronecker_factors(c, sizes)
    assert torch.allclose(torch.kron(torch.kron(*factors[:2]), factors[2]), c, rtol=1e-12)
    # a generic SPD matrix: each factor is its partial trace (by an explicit loop), scaled
    m = torch.randn(24, 24, generator=g, dtype=torch.float64)
    c = m @ m.mT
    factors = kronecker_factors(c, sizes)
    t = c.reshape(3, 4, 2, 3, 4, 2)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(3):
        for k in range(2):
            ref += t[i, :, k, i, :, k]
    scale = float(torch.trace(c)) ** (-2 / 3)
    assert torch.allclose(factors[1], ref * scale, rtol=1e-12)
    # the product keeps the trace
    assert math.prod(float(torch.trace(f)) for f in factors) == pytest.approx(
        float(torch.trace(c)), rel=1e-12
    )


def test_padded_inputs_get_the_mean_energy_and_the_whitening_round_trips():
    g = gen(3)
    m = torch.randn(10, 10, generator=g, dtype=torch.float64)
    c = m @ m.mT + torch.eye(10, dtype=torch.float64)
    white = kronecker_whitening(c, [3, 4])  # 12 modes for 10 inputs: 2 padded
    full = torch.kron(white.chol[0] @ white.chol[0].mT, white.chol[1] @ white.chol[1].mT)
    padded = torch.zeros(12, 12, dtype=torch.float64)
    padded[:10, :10] = c
    padded[10:, 10:] = torch.eye(2, dtype=torch.float64) * float(torch.diagonal(c).mean())
    assert torch.allclose(full, torch.kron(*kronecker_factors(padded, [3, 4])), rtol=1e-12)
    # whiten then unwhiten each input mode: the identity
    t = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    w = white.whiten(t, 1)
    assert torch.allclose(w.reshape(5, 12), t.reshape(5, 12) @ torch.kron(*white.chol), rtol=1e-12)
    back = white.unwhiten(white.unwhiten(w, 0, 1), 1, 2)
    assert torch.allclose(back, t, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- Kronecker data


def test_kronecker_data_whitened_tt_is_the_output_optimum():
    lin = linear()
    x, c = kron_data()
    dec = plan("tt", lin, ctx_for(x), **TT_2)
    assert dec.resolved["whitened"] is True and dec.resolved["ranks"] == [8]
    measured = out_err(dec.state, lin, x)
    assert dec.predicted_output_error == pytest.approx(measured, rel=1e-6)
    # d = 2: TT-SVD is one truncated SVD of the (out_1·in_1, out_2·in_2) unfolding of
    # W·S (S Sᵀ = C, any square root): with a Kronecker C that is the best output error
    root = torch.linalg.cholesky(c)
    w = lin.weight.detach().double() @ root
    unfolding = w.reshape(12, 10, 12, 7).permute(0, 2, 1, 3).reshape(144, 70)
    s2 = torch.linalg.svdvals(unfolding).square()
    optimum = math.sqrt(float(s2[8:].sum() / s2.sum()))
    assert dec.predicted_output_error == pytest.approx(optimum, rel=1e-5)
    plain = plan("tt", lin, ctx_for(x), whiten=False, **TT_2)
    assert out_err(plain.state, lin, x) > 1.4 * measured  # measured: 0.86 vs 0.53
    assert weights(plain.state) == weights(dec.state)


def test_kronecker_data_whitened_tucker_d1_is_eckart_young_on_the_output():
    # d = 1: one input mode, so the Kronecker factor is the whole second moment and
    # Tucker at ranks [r, r] is the rank-r factorization best on the data
    lin = linear(N_IN, 60)
    x, c = kron_data()
    dec = plan("tucker", lin, ctx_for(x), ranks=[10, 10], d=1)
    s2 = torch.linalg.svdvals(lin.weight.detach().double() @ torch.linalg.cholesky(c)).square()
    optimum = math.sqrt(float(s2[10:].sum() / s2.sum()))
    assert dec.predicted_output_error == pytest.approx(optimum, rel=1e-6)
    assert out_err(dec.state, lin, x) == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize("kind", ["tt", "tucker"])
def test_kronecker_data_predicted_error_is_the_measured_one_and_max_error_holds(kind):
    lin = linear()
    x, _ = kron_data()
    params = TT_3 if kind == "tt" else TUCKER_2
    dec = plan(kind, lin, ctx_for(x), **params)
    assert dec.predicted_output_error == pytest.approx(out_err(dec.state, lin, x), rel=1e-6)
    # max_error bounds the whitened error, which here is the output error exactly
    spec = {k: v for k, v in params.items() if k not in ("ranks", "rank")}
    for target in (0.3, 0.6):
        dec = plan(kind, lin, ctx_for(x), max_error=target, **spec)
        assert dec.predicted_output_error <= target
        assert out_err(dec.state, lin, x) <= target + 1e-6


@pytest.mark.parametrize("kind", ["tt", "tucker"])
def test_a_weight_of_low_rank_is_rebuilt_exactly_whitened(kind):
    # W with exact TT ranks [3, 3] / multilinear ranks 3: whitening acts on each mode
    # alone, so at those ranks the reconstruction (and the output) is exact
    g = gen(5)
    out_f, in_f = [4, 6, 5], [3, 4, 7]
    if kind == "tt":
        r = [1, 3, 3, 1]
        cores = [
            torch.randn(r[k], out_f[k], in_f[k], r[k + 1], generator=g, dtype=torch.float64)
            for k in range(3)
        ]
        from tnsurgery.decompositions.tt import tt_matrix_full

        w = tt_matrix_full(cores)
        params = {"ranks": [3, 3], "in_factors": in_f, "out_factors": out_f}
    else:
        core = torch.randn(3, 3, 3, 3, 3, 3, generator=g, dtype=torch.float64)
        fs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in out_f + in_f]
        from tnsurgery.decompositions.tucker import tucker_to_full

        w = tucker_to_full(core, fs).reshape(120, 84)
        params = {"rank": 3, "in_factors": in_f, "out_factors": out_f}
    lin = nn.Linear(84, 120, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = correlated_data().double()
    dec = plan(kind, lin, ctx_for(x), **params)
    assert dec.resolved["whitened"] is True
    assert dec.predicted_error < 1e-9 and dec.predicted_output_error < 1e-9
    assert out_err(dec.state, lin, x) < 1e-9


# ------------------------------------------------------------ general data


@pytest.mark.parametrize("data", ["correlated", "kronecker"])
@pytest.mark.parametrize(
    ("kind", "params"),
    [("tt", TT_3), ("tt", TT_2), ("tucker", TUCKER_2)],
    ids=["tt3", "tt2", "tucker"],
)
def test_whitening_lowers_the_output_error_at_the_same_ranks(kind, params, data):
    lin = linear()
    x = correlated_data() if data == "correlated" else kron_data()[0]
    white = plan(kind, lin, ctx_for(x), **params)
    plain = plan(kind, lin, ctx_for(x), whiten=False, **params)
    assert plain.predicted_output_error is None and "whitened" not in plain.resolved
    assert white.resolved["ranks"] == plain.resolved["ranks"]
    assert weights(white.state) == weights(plain.state)
    assert white.params_after == plain.params_after
    measured = out_err(white.state, lin, x)
    # Kronecker or not, the reported error is exact (it uses the full second moment)
    assert white.predicted_output_error == pytest.approx(measured, rel=1e-6)
    # measured (whitened / plain): correlated 0.76/0.92, 0.69/0.84, 0.77/0.93;
    # Kronecker 0.69/0.88, 0.52/0.83, 0.67/0.86
    assert measured < (0.9 if data == "correlated" else 0.85) * out_err(plain.state, lin, x)
    # and the weight error is what was traded for it
    assert white.predicted_error > plain.predicted_error


@pytest.mark.parametrize("kind", ["tt", "tucker"])
def test_padded_layers_whiten_and_predict_their_output_error(kind):
    lin = linear(83, 61, seed=1)  # primes: both sides padded
    x = correlated_data()[:, :83].double()
    params = {"rank": 4, "d": 2} if kind == "tt" else {"rank": 3, "d": 2}
    white = plan(kind, lin, ctx_for(x, damping=1e-3), **params)
    plain = plan(kind, lin, ctx_for(x, damping=1e-3), whiten=False, **params)
    assert white.resolved["padded"] == plain.resolved["padded"] == [63, 84]
    assert weights(white.state) == weights(plain.state)
    # against the damped second moment C + 1e-3·mean(diag C)·I, computed here
    c = x.mT @ x / x.shape[0]
    c = c + 1e-3 * float(torch.diagonal(c).mean()) * torch.eye(83, dtype=torch.float64)
    w = lin.weight.detach().double()
    delta = white.state.to_dense().detach().double() - w
    ref = math.sqrt(float(torch.trace(delta @ c @ delta.mT) / torch.trace(w @ c @ w.mT)))
    assert white.predicted_output_error == pytest.approx(ref, rel=1e-9)
    # measured: tt 0.78 vs 0.89, tucker 0.89 vs 0.96
    assert out_err(white.state, lin, x) < 0.95 * out_err(plain.state, lin, x)


def test_no_whitening_without_stats_of_the_layers_size_or_on_conv():
    lin = linear()
    x = correlated_data()
    base = plan("tt", lin, Context(name="layer"), **TT_3)
    wrong = plan("tt", lin, ctx_for(x[:, :40]), **TT_3)  # stats of another size
    off = plan("tt", lin, ctx_for(x), whiten=False, **TT_3)
    for dec in (wrong, off):
        assert dec.predicted_output_error is None and dec.resolved == base.resolved
        for a, b in zip(dec.state.cores, base.state.cores, strict=True):
            assert torch.equal(a, b)
    conv = nn.Conv2d(4, 8, 3)
    stats = InputStats(torch.eye(36, dtype=torch.float64), 10)
    dec = tucker.plan(conv, tucker.TuckerParams(ranks=[4, 2]), Context(name="c", input_stats=stats))
    assert dec.predicted_output_error is None and "whitened" not in dec.resolved


def test_rank_deficient_data_without_damping_still_decomposes():
    lin = linear()
    x = torch.randn(30, 5, generator=gen(7)) @ torch.randn(5, N_IN, generator=gen(8))
    for kind, params in (("tt", TT_3), ("tucker", TUCKER_2)):
        dec = plan(kind, lin, ctx_for(x), **params)
        assert all(torch.isfinite(p).all() for p in dec.state.parameters())
        assert dec.predicted_output_error == pytest.approx(out_err(dec.state, lin, x), rel=1e-5)


def test_the_budget_cache_keeps_one_whitening_per_layer():
    lin = linear()
    x = correlated_data()
    cache: dict = {}
    ctx = ctx_for(x, cache=cache)
    first = plan(
        "tt", lin, ctx, param_ratio=0.2, **{k: TT_3[k] for k in ("in_factors", "out_factors")}
    )
    (key,) = [k for k in cache if k[0] == "kronecker_whitening"]
    white = cache[key]
    again = plan("tucker", lin, ctx, param_ratio=0.2, **{k: TUCKER_2[k] for k in ("in_factors",)})
    second = plan(
        "tt", lin, ctx, param_ratio=0.2, **{k: TT_3[k] for k in ("in_factors", "out_factors")}
    )
    assert cache[key] is white and len(cache) == 2  # tucker's modes differ: its own entry
    assert second.predicted_output_error == first.predicted_output_error
    assert again.predicted_output_error is not None


# ------------------------------------------------------------- end to end


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_OUT), nn.ReLU(), nn.Linear(N_OUT, 60)).eval()


def e2e_spec(path, tt_params=None, tucker_params=None, samples=1000):
    return {
        "rules": [
            {"match": "0", "transform": "tt", "params": {**TT_2, **(tt_params or {})}},
            {
                "match": "2",
                "transform": "tucker",
                "params": {"ranks": [0.5, 0.5], **(tucker_params or {})},
            },
        ],
        "calibration": {
            "data": {"source": "tensors", "path": str(path)},
            "samples": samples,
            "damping": 0.0,
        },
    }


def test_surgery_with_calibration_whitens_tt_and_tucker(mlp, tmp_path):
    x = correlated_data().float()
    torch.save(x, tmp_path / "calib.pt")
    spec = e2e_spec(tmp_path / "calib.pt")
    p = surgery.plan(mlp, spec)
    small = surgery.apply(mlp, spec)
    seen = x[:1000]  # the samples calibration ran
    with torch.no_grad():
        hidden = torch.relu(mlp[0](seen))  # the second layer's inputs in the original
    first, second = p.targets
    assert first.resolved["whitened"] is True and second.resolved["whitened"] is True
    assert first.predicted_output_error == pytest.approx(out_err(small[0], mlp[0], seen), rel=1e-5)
    assert second.predicted_output_error == pytest.approx(
        out_err(small[2], mlp[2], hidden), rel=1e-5
    )
    manifest = surgery.get_manifest(small)["plan"]["targets"]
    assert [t["predicted_output_error"] for t in manifest] == pytest.approx(
        [first.predicted_output_error, second.predicted_output_error]
    )
    # "whiten": false is the old result, exactly as without calibration
    off = surgery.apply(mlp, e2e_spec(tmp_path / "calib.pt", {"whiten": False}, {"whiten": False}))
    none = surgery.apply(mlp, {"rules": spec["rules"]})
    for a, b in zip(off[0].cores, none[0].cores, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(off[2].core, none[2].core)
    assert all(torch.equal(a, b) for a, b in zip(off[2].in_proj, none[2].in_proj, strict=True))
    assert (
        surgery.plan(mlp, e2e_spec(tmp_path / "calib.pt", {"whiten": False}))
        .targets[0]
        .predicted_output_error
        is None
    )
    assert out_err(small[0], mlp[0], seen) < 0.85 * out_err(off[0], mlp[0], seen)
    # the whitened layers train: gradients reach every core and factor
    small.train()
    small(x[:16]).square().sum().backward()
    for layer in (small[0], small[2]):
        grads = [q.grad for q in layer.parameters()]
        assert all(
            gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads
        )
