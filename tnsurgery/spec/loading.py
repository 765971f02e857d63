"""Reading a spec: JSON or YAML files, dicts and :class:`Spec` objects, validated in
one pass with every problem reported at once in a :class:`~tnsurgery.errors.SpecError`
whose lines name the rule (index and pattern) and the field; and the JSON Schema of
the spec with every installed transform's params.

A spec file may come from someone else: it is read as data only (YAML's safe
loader, no tags that build objects, no timestamps), at most
:data:`~tnsurgery.spec.bounds.MAX_SPEC_BYTES`, and its data is then held to the
bounds of :mod:`tnsurgery.spec.bounds` (values with aliases expanded, nesting,
integers, finite numbers). A key given twice in one object (JSON or YAML) is refused
with its line, never silently dropped. Every defect, whatever the parser says, is a
:class:`SpecError`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from tnsurgery.errors import SpecError, did_you_mean
from tnsurgery.plugins import Registry, get_registry
from tnsurgery.spec.bounds import (
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_VALUES,
    HugeInt,
    bounds_problem,
)
from tnsurgery.spec.evaluation import Evaluation
from tnsurgery.spec.model import Budget, Calibration, Rule, Spec
from tnsurgery.spec.resolve import PROBLEM, field_names, rule_label
from tnsurgery.spec.training import (
    CheckpointOptions,
    DistillOptions,
    ProgressiveRank,
    Training,
    TTOptions,
)


def load_spec(source: Spec | dict | str | Path, registry: Registry | None = None) -> Spec:
    """Read and fully validate a spec; raise :class:`SpecError` listing every problem.

    ``source`` is a :class:`Spec`, a dict, or the path of a ``.json`` /
    ``.yaml`` file. Rule params are checked by each transform's params model
    from ``registry`` (the installed plugins by default); the validated
    params are available as ``rule.parsed_params``, the transform as
    ``rule.resolved_transform``. The data is first held to the bounds of
    :mod:`tnsurgery.spec.bounds`, whatever the source.
    """
    name = None
    if isinstance(source, Spec):
        raw: Any = source.to_dict()
    elif isinstance(source, dict):
        raw = source
    elif isinstance(source, (str, Path)):
        name = str(source)
        raw = read_spec_file(source)
    else:
        raise SpecError([f"a spec is a dict, a path or a Spec, not {type(source).__name__}"])
    if not isinstance(raw, dict):
        raise SpecError([f"spec: expected an object with 'rules', got {type(raw).__name__}"], name)
    out_of_bounds = None if name else bounds_problem(raw)  # a file's data was checked
    if out_of_bounds:  # Spec.model_validate checks too; here it comes first, alone
        raise SpecError([out_of_bounds], source=name)
    registry = registry or get_registry()
    try:
        return Spec.model_validate(raw, context={"registry": registry})
    except ValidationError as exc:
        raise SpecError(spec_problems(exc, raw), source=name) from None


def spec_problems(exc: ValidationError, raw: Any) -> list[str]:
    """The lines a user reads for a spec's validation error: one per problem, naming
    the rule and the field; spec-level problems first, then by rule."""
    lines = []
    for err in exc.errors(include_url=False):
        if err["type"] == PROBLEM:
            lines.append(err["ctx"]["line"])
        else:
            lines.append(_format_one(tuple(err["loc"]), err, raw))
    return sorted(lines, key=_problem_order)


def _problem_order(line: str) -> int:
    """Spec-level problems first, then by rule index (stable within a rule)."""
    m = re.match(r"rule (\d+) ", line)
    return int(m.group(1)) + 1 if m else 0


def _format_one(loc: tuple, err: dict, raw: Any) -> str:
    where = "spec"
    field_loc = loc
    owner: type[BaseModel] = Spec
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        i = loc[1]
        rules = raw.get("rules") if isinstance(raw, dict) else None
        match = None
        if isinstance(rules, list) and i < len(rules) and isinstance(rules[i], dict):
            match = rules[i].get("match")
        where = rule_label(i, match)
        field_loc = loc[2:]
        owner = Rule
    elif len(loc) >= 2 and loc[0] in ("budget", "calibration", "training", "evaluation"):
        owner = {
            "budget": Budget,
            "calibration": Calibration,
            "training": Training,
            "evaluation": Evaluation,
        }[loc[0]]
        if loc[0] == "training" and len(loc) >= 3:
            owner = {
                "distill": DistillOptions,
                "checkpoint": CheckpointOptions,
                "tt": TTOptions,
                "progressive_rank": ProgressiveRank,
            }.get(loc[1], owner)
    field = ".".join(str(p) for p in field_loc)
    if err["type"] == "extra_forbidden":
        name = str(field_loc[-1]) if field_loc else "?"
        valid = err.get("ctx", {}).get("valid") or field_names(owner)
        hint = did_you_mean(name, valid)
        return f"{where}: unknown field '{field}'{hint} (valid: {', '.join(valid)})"
    msg = err["msg"].removeprefix("Value error, ")
    if not field:
        return f"{where}: {msg}"
    return f"{where}: field '{field}': {msg}"


LONGEST_INT_LITERAL = 40
"""An integer literal longer than this is never converted (converting a long one is
slow, and anything over :data:`~tnsurgery.spec.bounds.MAX_SPEC_INT` is refused)."""


def read_spec_file(path: str | Path) -> Any:
    """Parse a JSON or YAML spec file into plain data; errors name the file and line.

    The file is at most :data:`~tnsurgery.spec.bounds.MAX_SPEC_BYTES`, and the data
    within the bounds of :mod:`tnsurgery.spec.bounds`; anything else is a
    :class:`SpecError`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            blob = f.read(MAX_SPEC_BYTES + 1)  # never more, whatever the file is
    except FileNotFoundError:
        raise SpecError([f"spec file not found: {p}"], source=str(p)) from None
    except OSError as exc:
        raise SpecError([f"cannot read spec file {p}: {exc}"], source=str(p)) from None
    if len(blob) > MAX_SPEC_BYTES:
        raise SpecError(
            [f"spec file {p} is larger than the limit of {MAX_SPEC_BYTES} bytes"], source=str(p)
        )
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"cannot read spec file {p}: {exc}"], source=str(p)) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        data = _parse_yaml(text, str(p))
    else:
        data = _parse_json(text, str(p))
    out_of_bounds = bounds_problem(data)
    if out_of_bounds:
        raise SpecError([out_of_bounds], source=str(p))
    return data


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, parse_int=_json_int, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise SpecError([f"not valid JSON: {_json_duplicate(text)}"], source=source) from None
    except json.JSONDecodeError as exc:
        raise SpecError(
            [f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"],
            source=source,
        ) from None
    except RecursionError:  # the parser's own limit on nesting, far above ours
        raise SpecError(
            [f"not valid JSON: nested deeper than the limit of {MAX_SPEC_DEPTH} levels"],
            source=source,
        ) from None
    except ValueError as exc:
        raise SpecError([f"not valid JSON: {exc}"], source=source) from None


def _json_int(text: str) -> int | HugeInt:
    return HugeInt(text) if len(text) > LONGEST_INT_LITERAL else int(text)


class _DuplicateKey(Exception):
    """A JSON object gives a key twice (located afterwards by :func:`_json_duplicate`)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _json_duplicate(text: str) -> str:
    """Where the first key given twice in one object of ``text`` is, in the words of
    the YAML reader: ``duplicate key 'k' (first at line 2) at line 5, column 3``."""
    stack: list[dict[str, int] | None] = []  # per open object: key -> its line
    expect_key = False
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token == "{":
            stack.append({})
            expect_key = True
        elif token == "[":
            stack.append(None)
        elif token in "]}":
            stack.pop()
        elif token == ",":
            expect_key = bool(stack) and stack[-1] is not None
        elif token == ":":
            expect_key = False
        elif expect_key:
            keys, key = stack[-1], json.loads(token)
            line = text.count("\n", 0, m.start()) + 1
            if key in keys:
                column = m.start() - text.rfind("\n", 0, m.start())
                return (
                    f"duplicate key {_short(key)} (first at line {keys[key]}) "
                    f"at line {line}, column {column}"
                )
            keys[key] = line
            expect_key = False
    return "duplicate key in an object"


def _short(key: Any) -> str:
    text = repr(key) if not isinstance(key, str) else f"'{key}'"
    return text if len(text) <= 60 else text[:57] + "...'"


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ctx_mark = getattr(exc, "context_mark", None)
        if ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
            where += f" (in what starts at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
        raise SpecError([f"not valid YAML: {problem}{where}"], source=source) from None
    except RecursionError:
        raise SpecError(["not valid YAML: nested too deeply"], source=source) from None
    except Exception as exc:  # a tagged scalar the constructor cannot convert (!!int x)
        raise SpecError([f"not valid YAML: {type(exc).__name__}: {exc}"], source=source) from None


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, bounded: collections nest at most
    :data:`~tnsurgery.spec.bounds.MAX_SPEC_DEPTH` deep, merge keys (``<<``) copy at
    most :data:`~tnsurgery.spec.bounds.MAX_SPEC_VALUES` entries in all, long integer
    literals are left unconverted (then refused) and timestamps stay strings."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._merged = 0
        self._flat_sizes: dict[int, int] = {}
        self._keys_checked: set[int] = set()

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH and (
                self.check_event(SequenceStartEvent) or self.check_event(MappingStartEvent)
            ):
                raise ComposerError(
                    None,
                    None,
                    f"nested deeper than the limit of {MAX_SPEC_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node):
        if id(node) not in self._keys_checked:  # its own keys, before merges are copied in
            self._keys_checked.add(id(node))
            self._check_unique_keys(node)
        added = self._flat_size(node) - len(node.value)
        if added > 0:
            self._merged += added
            if self._merged > MAX_SPEC_VALUES:
                raise ConstructorError(
                    None,
                    None,
                    f"merge keys ('<<') copy more than {MAX_SPEC_VALUES} entries",
                    node.start_mark,
                )
        super().flatten_mapping(node)

    def _check_unique_keys(self, node) -> None:
        """A key given twice in one mapping is an error (YAML would keep the last);
        a key overriding one copied by a merge key (``<<``) is not."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: refused when the mapping is built
                continue
            if first is not None:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {_short(key)} (first at line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1

    def _flat_size(self, node) -> int:
        """Entries of a mapping once its merge keys are flattened (not copying)."""
        key = id(node)
        if key not in self._flat_sizes:
            size = 0
            for key_node, value_node in node.value:
                if key_node.tag != "tag:yaml.org,2002:merge":
                    size += 1
                elif isinstance(value_node, MappingNode):
                    size += self._flat_size(value_node)
                elif isinstance(value_node, SequenceNode):
                    size += sum(
                        self._flat_size(v) for v in value_node.value if isinstance(v, MappingNode)
                    )
            self._flat_sizes[key] = size
        return self._flat_sizes[key]

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if isinstance(text, str) and len(text) > LONGEST_INT_LITERAL:
            return HugeInt(text)
        return super().construct_yaml_int(node)


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the whole spec, each installed transform's params included.

    Editors use it through the spec's ``"$schema"`` key: ``transform`` is an
    enum of the installed names and ``params`` is checked against the chosen
    transform's params model.
    """
    registry = registry or get_registry()
    schema = Spec.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    rule = defs["Rule"]
    names = sorted(registry.transforms)
    rule["properties"]["transform"]["enum"] = names
    branches = []
    for name in names:
        params_schema = registry.transforms[name].params_model.model_json_schema()
        for k, v in params_schema.pop("$defs", {}).items():
            defs[k] = v
        key = f"params_{name}"
        defs[key] = params_schema
        branches.append(
            {
                "if": {"properties": {"transform": {"const": name}}, "required": ["transform"]},
                "then": {"properties": {"params": {"$ref": f"#/$defs/{key}"}}},
            }
        )
    if branches:
        rule["allOf"] = branches
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tnsurgery spec"
    return schema
