"""Every family of the zoo under every transform, through the API: the surgery runs
(plan, apply with the sample input, forward, a measured output error, save then load
onto a fresh instance giving identical outputs), or it is refused clearly (a
tnsurgery error naming the module types and why) — never a traceback, never a
silently unchanged model."""

from __future__ import annotations

import re

import pytest

from tests.zoo.conftest import needs
from tests.zoo.families import BY_KEY, FAMILIES
from tests.zoo.runner import NEAR_LOSSLESS_MAX_ERROR, TRANSFORMS, accepted_types, finite

CELLS = [pytest.param(f, t, id=f"{f.key}-{t}") for f in FAMILIES for t in TRANSFORMS]
FAMILY_PARAMS = [pytest.param(f, id=f.key) for f in FAMILIES]

# Why a selected module may stay as it is: each names the cause (tied weights, a
# depthwise conv, a module the model never calls, a shape a transform cannot split,
# a reduction that would not shrink it)
CLEAR_REASONS = re.compile(
    r"tied weights|groups=\d+: only groups=1 convolutions|never called|"
    r"reads this module's weight directly|does not factor into|would not shrink"
)
REFUSAL_TYPES = ("MatchError", "SpecError", "SurgeryError", "LayerRefusedError")


@pytest.mark.parametrize(("family", "transform"), CELLS)
def test_surgery_runs_or_is_refused_clearly(zoo, family, transform):
    needs(family)
    cell = zoo.cell(family, transform)
    expected = family.refusals.get(transform)
    if expected is not None:
        assert cell.status == "refused", f"expected a refusal ({expected}), got {cell}"
        assert cell.error_type in REFUSAL_TYPES
        assert expected in cell.message
        # it names the transform's types, or what each selected module is and why
        assert any(t in cell.message for t in accepted_types(transform)) or (
            "nothing was replaced" in cell.message and CLEAR_REASONS.search(cell.message)
        ), cell.message
        return
    assert cell.status == "ok", cell.message
    assert 0 < cell.replaced <= cell.targets
    assert cell.replaced + sum(cell.not_replaced.values()) == cell.targets
    # the outputs changed (no silent no-op), by a finite amount, as the manifest says
    assert finite(cell.output_error) and cell.output_error > 0
    assert finite(cell.manifest_error) and cell.manifest_error > 0
    for name, reason in cell.reasons.items():
        assert CLEAR_REASONS.search(reason), f"{name}: {reason!r}"
    assert cell.loaded_equal is True  # tnsurgery.load onto a fresh instance


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_factorize_near_lossless_gives_a_small_output_error(zoo, family):
    needs(family)
    cell = zoo.cell(family, "factorize")
    assert finite(cell.near_lossless_error)
    assert cell.near_lossless_error < NEAR_LOSSLESS_MAX_ERROR
    assert cell.near_lossless_error < cell.output_error  # a stronger cut costs more


@pytest.mark.parametrize("transform", ["factorize", "tt", "tucker", "qat"])
def test_swin_window_attention_linears_are_refused_as_weights_read_directly(zoo, transform):
    """torchvision's Swin calls F.linear on qkv.weight and proj.weight: replacing those
    Linears would change nothing the model computes, so each is refused, by name."""
    cell = zoo.cell(BY_KEY["swin"], transform)
    attn = {n: r for n, r in cell.reasons.items() if re.search(r"\.attn\.(qkv|proj)$", n)}
    assert len(attn) == 2 * 3  # three blocks
    assert all("never called" in r or "directly" in r for r in attn.values())
    assert cell.replaced > 0 and cell.output_error > 0  # the rest is surgered


@pytest.mark.parametrize("transform", ["factorize", "tt", "tucker", "qat"])
def test_vit_multihead_attention_is_split_and_its_projections_compressed(zoo, transform):
    """torchvision's ViT runs nn.MultiheadAttention, which reads out_proj.weight itself:
    it is split into q/k/v/out Linears first (``multihead_attention``), then compressed."""
    cell = zoo.cell(BY_KEY["vit_tv"], transform)
    assert cell.status == "ok", cell.message
    blocks = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert cell.splits == blocks
    assert cell.reasons == {}  # nothing left out: every projection replaced
    assert cell.replaced == cell.targets == 1 + 2 * (4 + 2) + 1 - (transform == "tt")


def test_a_refusal_names_the_types_its_rule_left_out(zoo):
    cell = zoo.cell(BY_KEY["gpt2"], "tucker")
    assert cell.status == "refused" and "nothing was replaced" in cell.message
    assert "Conv1D" in cell.message, cell.message
