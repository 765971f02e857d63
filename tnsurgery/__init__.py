"""tnsurgery: declarative surgery on trained PyTorch models.

The public API, in one place (``docs/architecture.md`` says which module holds what):

- surgery: :func:`apply`, :func:`plan`, :func:`convert` (export QAT layers),
  :func:`train` (the spec's training section alone), :func:`apply_checkpoint` (a
  Hugging Face checkpoint directory, streamed block by block);
- files: :func:`load`, :func:`save`, :func:`get_manifest`;
- the spec: :class:`Spec`, :func:`load_spec`;
- for plugin authors: :data:`hookimpl`, :class:`Transform`, :class:`Decision`,
  :class:`Context`;
- the errors users catch.

``from tnsurgery import surgery`` gives the same functions as ``surgery.apply``,
``surgery.plan``, ``surgery.convert`` and ``surgery.train``.
"""

from tnsurgery._version import __version__
from tnsurgery.errors import (
    DataSourceError,
    LayerRefusedError,
    MatchError,
    ModelLoadError,
    OutputError,
    SpecError,
    SurgeryError,
    TnsurgeryError,
    UserInputError,
)
from tnsurgery.hookspecs import hookimpl
from tnsurgery.io import install_hf, load, save
from tnsurgery.spec import Spec, load_spec
from tnsurgery.streaming import apply_checkpoint
from tnsurgery.surgery import apply, convert, get_manifest, plan, train
from tnsurgery.transform import Context, Decision, Transform

# transformers' from_pretrained (and SentenceTransformer) load surgered directories
# once tnsurgery is imported; transformers itself is imported only when the user does
install_hf()

__all__ = [
    "Context",
    "DataSourceError",
    "Decision",
    "LayerRefusedError",
    "MatchError",
    "ModelLoadError",
    "OutputError",
    "Spec",
    "SpecError",
    "SurgeryError",
    "TnsurgeryError",
    "Transform",
    "UserInputError",
    "__version__",
    "apply",
    "apply_checkpoint",
    "convert",
    "get_manifest",
    "hookimpl",
    "load",
    "load_spec",
    "plan",
    "save",
    "train",
]
