"""The few exception types users catch.

Every error that bad input can cause (a wrong spec, a rule that matches
nothing, an unreadable or untrusted model file) derives from
:class:`UserInputError`; the CLI turns those into a message and exit code 2,
never a traceback. Anything else is a bug (exit code 1).
"""

from __future__ import annotations

import difflib


class TnsurgeryError(Exception):
    """Base class of every error raised on purpose by tnsurgery."""


class UserInputError(TnsurgeryError):
    """The input (spec, file, model, option) is wrong; the message says how to fix it."""


class SpecError(UserInputError):
    """A spec failed validation. ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"invalid spec{where}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


class MatchError(SpecError):
    """A rule matched no module of the model (and did not set ``allow_empty``)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        UserInputError.__init__(self, "\n".join(self.problems))


class ModelLoadError(UserInputError):
    """A model file could not be read safely (missing, truncated, untrusted classes...)."""


class OutputError(UserInputError):
    """An output cannot be written: the path is taken by something tnsurgery does not
    own, overlaps the input, or the system refused (disk full, read-only, permissions).
    Nothing was written."""


class DataSourceError(UserInputError):
    """A data source failed to give its batches (calibration, training, evaluation):
    ``source`` is its name, ``cause`` what it raised (or why), ``detail`` which
    function or file it read, when it says."""

    def __init__(self, source: str, cause: BaseException | str, detail: str | None = None):
        self.source = source
        self.cause = cause
        self.detail = detail
        why = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        what = f"data source '{source}'" + (f" ({detail})" if detail else "")
        super().__init__(f"data: {what} failed: {why}")


class SurgeryError(TnsurgeryError):
    """A transform failed while building a replacement; the model was left untouched."""


class LayerRefusedError(SurgeryError, UserInputError):
    """A transform cannot build the layer the spec asks for (params that do not fit the
    module, a size beyond what the machine can hold): the spec is to change. The
    model was left untouched. A user error (exit 2), unlike a plain
    :class:`SurgeryError`, which is a bug in a transform."""


def did_you_mean(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """``; did you mean 'x'?`` for the valid name closest to ``name``, or ``""``.

    The one "did you mean" of every message (specs, plugin names, patterns)."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
