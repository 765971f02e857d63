"""Files: safe loading of the models users name, and surgered models written and read
back as a ``manifest.json`` + ``.safetensors`` pair, atomically.

- :mod:`~tnsurgery.io.models`: :func:`load_model` (pickles on an allow list, state
  dicts and safetensors with ``--arch``, Hugging Face directories);
- :mod:`~tnsurgery.io.pairs`: :func:`save`, :func:`save_like_input`, and the replay
  behind :func:`load` (:mod:`~tnsurgery.io.models`, which builds a Hugging Face
  output's base from its config);
- :mod:`~tnsurgery.io.hf_entry`, :mod:`~tnsurgery.io.hf_quantizer`: what makes
  ``from_pretrained`` load a surgered Hugging Face directory (:func:`install_hf`);
- :mod:`~tnsurgery.io.files`: names, safetensors reading, state dicts that fit,
  importing what the user named.
"""

from tnsurgery.atomic import atomic_dir, atomic_files
from tnsurgery.io.files import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    build_arch,
    cwd_on_path,
    import_name,
    read_safetensors,
)
from tnsurgery.io.hf_quantizer import install as install_hf
from tnsurgery.io.models import load, load_model, torch_load_safely
from tnsurgery.io.outputs import check_apart
from tnsurgery.io.pairs import check_output, save, save_like_input

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "LoadedModel",
    "atomic_dir",
    "atomic_files",
    "build_arch",
    "check_apart",
    "check_output",
    "cwd_on_path",
    "import_name",
    "install_hf",
    "load",
    "load_model",
    "read_safetensors",
    "save",
    "save_like_input",
    "torch_load_safely",
]
