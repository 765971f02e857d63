"""The spec: pydantic models of the file a user writes (the public contract).

- :mod:`tnsurgery.spec.model`: :class:`Spec`, :class:`Rule`, :class:`Budget`,
  :class:`Calibration`, validated in one pass against the plugin registry;
- :mod:`tnsurgery.spec.training`: the ``training`` section's options;
- :mod:`tnsurgery.spec.resolve`: what the plugins define (transforms, params,
  data sources, trainer), checked with messages that name rule and field;
- :mod:`tnsurgery.spec.loading`: :func:`load_spec` (JSON/YAML files, dicts,
  :class:`Spec`) and :func:`json_schema`;
- :mod:`tnsurgery.spec.bounds`: the limits on a spec's data (file size, values with
  YAML aliases expanded, nesting, integers, finite numbers): a spec may come from
  someone else.
"""

from tnsurgery.spec.loading import json_schema, load_spec, read_spec_file, spec_problems
from tnsurgery.spec.model import Budget, Calibration, PatternList, Rule, Spec
from tnsurgery.spec.resolve import rule_label
from tnsurgery.spec.training import (
    CheckpointOptions,
    DistillOptions,
    ProgressiveRank,
    Training,
    TTOptions,
)

__all__ = [
    "Budget",
    "Calibration",
    "CheckpointOptions",
    "DistillOptions",
    "PatternList",
    "ProgressiveRank",
    "Rule",
    "Spec",
    "TTOptions",
    "Training",
    "json_schema",
    "load_spec",
    "read_spec_file",
    "rule_label",
    "spec_problems",
]
