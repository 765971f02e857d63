"""tnsurgery: declarative surgery on trained PyTorch models.

The public API: :func:`apply`, :func:`plan`, :func:`load`, :class:`Spec`,
and the errors users catch. ``from tnsurgery import surgery`` gives the same
functions under ``surgery.apply`` / ``surgery.plan``.
"""

from tnsurgery._version import __version__
from tnsurgery.errors import (
    MatchError,
    ModelLoadError,
    SpecError,
    SurgeryError,
    TnsurgeryError,
    UserInputError,
)
from tnsurgery.hookspecs import hookimpl
from tnsurgery.io import load, save
from tnsurgery.spec import Spec, load_spec
from tnsurgery.surgery import apply, get_manifest, plan

__all__ = [
    "MatchError",
    "ModelLoadError",
    "Spec",
    "SpecError",
    "SurgeryError",
    "TnsurgeryError",
    "UserInputError",
    "__version__",
    "apply",
    "get_manifest",
    "hookimpl",
    "load",
    "load_spec",
    "plan",
    "save",
]
