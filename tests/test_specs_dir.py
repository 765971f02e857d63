"""Every shipped spec validates, and the shipped JSON Schema is current (torchtune-style)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec import json_schema, load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
SPEC_FILES = sorted(p for p in SPECS.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
SPEC_FILES = [p for p in SPEC_FILES if p.name != "spec.schema.json"]


def builtin_registry() -> Registry:
    full = get_registry()
    reg = Registry()
    for name, t in full.transforms.items():
        if full.origins[name] == "builtin":
            reg.transforms[name] = t
            reg.origins[name] = "builtin"
    return reg


def _read(path: Path):
    text = path.read_text()
    return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)


def test_there_are_example_specs():
    assert len(SPEC_FILES) >= 3


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_shipped_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.rules
    for rule in spec.rules:
        assert rule.parsed_params is not None


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_shipped_spec_passes_the_json_schema(path):
    schema = json.loads((SPECS / "spec.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(_read(path)))
    assert errors == []


def test_shipped_schema_is_current():
    """specs/spec.schema.json == json_schema() of the built-in transforms.

    Regenerate with: python -c "from tests.test_specs_dir import write_schema; write_schema()"
    """
    shipped = json.loads((SPECS / "spec.schema.json").read_text())
    assert shipped == json_schema(builtin_registry())


def write_schema() -> None:
    """Rewrite specs/spec.schema.json from the built-in transforms."""
    text = json.dumps(json_schema(builtin_registry()), indent=2)
    (SPECS / "spec.schema.json").write_text(text + "\n")
