"""The spec's models: rules, budget, calibration, training (the public contract).

A :class:`Spec` is validated in one pass, however it is made
(:meth:`Spec.model_validate`, ``Spec(...)``, :func:`tnsurgery.spec.load_spec`):
pydantic checks the structure, then each rule's ``transform`` is resolved in the
plugin registry (the validation context's ``"registry"``, the installed plugins by
default) and its ``params`` parsed by that transform's params model; the data
sources and the trainer are checked the same way. A validated spec is complete:
``rule.resolved_transform`` and ``rule.parsed_params`` are set on every rule.

A spec may come from someone else: before anything else, its data is checked to be
within :mod:`tnsurgery.spec.bounds` (size, nesting, numbers), every pattern is
compiled (:func:`tnsurgery.matching.pattern_problem`) and every class name in
``types`` checked to be a name, never imported.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from tnsurgery.matching import pattern_problem, type_name_problem
from tnsurgery.plugins import get_registry
from tnsurgery.spec.bounds import bounds_problem
from tnsurgery.spec.evaluation import Evaluation
from tnsurgery.spec.resolve import plain, problem, resolve, rule_label
from tnsurgery.spec.training import Training
from tnsurgery.transform import Transform


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PatternList = Annotated[
    list[str], BeforeValidator(_as_list, json_schema_input_type=str | list[str])
]


def check_patterns(patterns: list[str]) -> list[str]:
    """``patterns``, each compiled: a ``ValueError`` naming every bad one otherwise
    (empty, too long, bad glob range, bad regex)."""
    bad = [msg for p in patterns if (msg := pattern_problem(p))]
    if bad:
        raise ValueError("; ".join(bad))
    return patterns


class Rule(BaseModel):
    """One rule: which modules (``match``/``exclude``/``types``) get which transform."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    match: PatternList = Field(
        ...,
        min_length=1,
        description="Pattern(s) over dotted module names. Glob: '*' is one name segment, "
        "'**' any number of segments; prefix 're:' for a Python regex (full match).",
    )
    exclude: PatternList = Field(
        default_factory=list, description="Patterns (same syntax as match) to leave out."
    )
    types: PatternList = Field(
        default_factory=list,
        description="Module class names ('Linear') or qualified names ('torch.nn.Linear').",
    )
    transform: str = Field(..., description="Name of the transform (see `tnsurgery plugins`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Params of the transform, checked by its own model."
    )
    allow_empty: bool = Field(False, description="Do not fail when the rule matches no module.")

    _params: BaseModel | None = PrivateAttr(default=None)
    _transform: Transform | None = PrivateAttr(default=None)

    @field_validator("match", "exclude")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)

    @field_validator("types")
    @classmethod
    def _type_names(cls, names: list[str]) -> list[str]:
        bad = [msg for n in names if (msg := type_name_problem(n))]
        if bad:
            raise ValueError("; ".join(bad))
        return names

    @property
    def parsed_params(self) -> BaseModel:
        """The params, validated by the transform's params model when the spec was."""
        if self._params is None:
            raise RuntimeError(
                "rule params not validated: validate the rule as part of a Spec "
                "(Spec.model_validate or tnsurgery.spec.load_spec)"
            )
        return self._params

    @property
    def resolved_transform(self) -> Transform:
        """The registered :class:`~tnsurgery.transform.Transform` the rule names,
        resolved when the spec was validated."""
        if self._transform is None:
            raise RuntimeError(
                "rule transform not resolved: validate the rule as part of a Spec "
                "(Spec.model_validate or tnsurgery.spec.load_spec)"
            )
        return self._transform

    def label(self, index: int) -> str:
        """``rule 0 (match 'encoder.**')``: how messages name this rule."""
        return rule_label(index, self.match)


class Budget(BaseModel):
    """A global budget over some rules' targets: per-layer ranks are then chosen by
    tnsurgery (see :mod:`tnsurgery.budget`), so those rules give no rank option."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    params: float | None = Field(
        None, gt=0, le=1, description="Fraction of the targets' parameters to keep, in total."
    )
    flops: float | None = Field(
        None, gt=0, le=1, description="Fraction of the targets' FLOPs to keep, in total."
    )
    rules: list[Annotated[int, Field(strict=True)]] | None = Field(
        None, description="Indices of the rules under the budget (default: all)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Budget:
        if (self.params is None) == (self.flops is None):
            raise ValueError("give exactly one of params, flops")
        return self


class Calibration(BaseModel):
    """Data-aware surgery: run the original model over ``samples`` examples of
    ``data`` and collect, for each target, the second moment of its inputs;
    transforms that use it (``factorize`` whitens) then minimize each layer's
    output error on that data rather than its weight error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: dict[str, Any] = Field(
        ...,
        description="Where the examples come from: {'source': 'tensors'|'callable'|'text'|"
        "'random'|<plugin>, ...its params}.",
    )
    samples: int = Field(512, ge=1, description="Examples to run (after batching).")
    batch_size: int = Field(32, ge=1, description="Examples per forward pass.")
    damping: float = Field(
        1e-2,
        ge=0,
        description="Added to the input second moment's diagonal, relative to its mean "
        "(keeps directions the data never visits from being ignored entirely).",
    )
    seed: int = Field(0, description="Seed of the data source (random data).")
    sequential: bool = Field(
        False,
        description="After surgery, re-solve each replacement in call order for the inputs "
        "it receives from the layers surgered before it, so later layers compensate "
        "earlier errors (GPTQ / SVD-LLM v2 style): one more pass over the data per group "
        "of layers sharing an input. Transforms with a refit: factorize (Linear).",
    )
    pipeline: Literal["auto", "blocks", "whole"] = Field(
        "auto",
        description="How a model read from a Hugging Face checkpoint directory is calibrated: "
        "'blocks' (the samples run through the embeddings once, then one block at a time is "
        "read, its targets' input statistics collected, surgered and refitted, its outputs "
        "becoming the next block's inputs: peak memory one block plus the hidden states), "
        "'whole' (the model in memory), or 'auto' (blocks when the model has a block stack). "
        "A model given in memory is always calibrated whole.",
    )
    blocks: str | None = Field(
        None,
        description="The block stack, as the name of its module list with '.*' "
        "(e.g. 'model.layers.*'); default: found from the model.",
        max_length=1000,
    )


class Spec(BaseModel):
    """A surgery spec: ordered rules, applied as passes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    schema_: str | None = Field(None, alias="$schema", description="JSON Schema, for editors.")
    version: Literal[1] = Field(1, description="Spec format version.")
    description: str | None = Field(None, description="Free text, kept in the manifest.")
    rules: list[Rule] = Field(..., min_length=1, description="Rules, applied in order.")
    budget: Budget | None = Field(
        None,
        description="Pick per-layer ranks of these rules to meet a global params/FLOPs budget "
        "with the least damage to the model's output.",
    )
    calibration: Calibration | None = Field(
        None,
        description="Data to run the original model on first: transforms then keep each "
        "layer's outputs on that data (e.g. whitened factorization).",
    )
    training: Training | None = Field(
        None,
        description="Train after the transforms: distill from the original model "
        "(label-free) or fine-tune.",
    )
    evaluation: Evaluation | None = Field(
        None,
        description="Measure the surgered model and the original side by side after surgery "
        "(and training): perplexity, cosine or accuracy, recorded in the manifest.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _resolve_plugins(cls, data: Any, handler, info: ValidationInfo) -> Spec:
        """One pass: the structure (pydantic), then what the plugins define (transform
        names and params, data sources, trainer), every problem reported together.
        The registry is the validation context's ``"registry"`` (the installed plugins
        when none is given). Data out of :mod:`~tnsurgery.spec.bounds` is refused
        first, alone."""
        if isinstance(data, Spec) and data.resolved:
            return data
        out_of_bounds = bounds_problem(data)
        if out_of_bounds:
            raise ValidationError.from_exception_data(cls.__name__, [problem((), out_of_bounds)])
        registry = (info.context or {}).get("registry") or get_registry()
        details: list[InitErrorDetails] = []
        try:
            spec = handler(data)
        except ValidationError as exc:
            details.extend(_as_details(exc))
            spec = None
        raw = plain(data)
        if isinstance(raw, dict):
            parsed = resolve(raw, registry, details)
            if spec is not None and not details:
                for i, (params, transform) in parsed.items():
                    spec.rules[i]._params, spec.rules[i]._transform = params, transform
        if details:
            raise ValidationError.from_exception_data(cls.__name__, details)
        return spec

    @property
    def resolved(self) -> bool:
        """Whether every rule's transform and params were resolved (always true for a
        spec that validation returned)."""
        return all(r._transform is not None for r in self.rules)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-compatible data (what the manifest records)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _as_details(exc: ValidationError) -> list[InitErrorDetails]:
    """A pydantic error's items, to be raised again with the plugins' problems."""
    out: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {"type": err["type"], "loc": err["loc"], "input": err["input"]}
        if "ctx" in err:
            item["ctx"] = err["ctx"]
        out.append(item)  # type: ignore[arg-type]
    return out
