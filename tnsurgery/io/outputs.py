"""Where a write may go: outputs touch only what tnsurgery owns and never the input.

- :func:`check_replaceable`: an output path that exists is replaced only if it is an
  earlier tnsurgery output (its manifest says so);
- :func:`check_apart`: the files an output will create or replace never overlap the
  files that define the input (the input, its manifest and weights, an input
  directory and its parents);
- :func:`file_records`: the size and SHA-256 of each file of a multi-file output,
  written into its manifest (written last), so a reader refuses a set that a crash
  left mixed or incomplete;
- :func:`copy_input_dir`: the extra files of a Hugging Face input directory, copied
  into the output without following a symlink out of that directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tnsurgery.errors import OutputError
from tnsurgery.io.files import HF_WEIGHT_SUFFIXES, MANIFEST_NAME, MAX_MANIFEST_BYTES
from tnsurgery.manifest import MANIFEST_FORMAT

# what a Hugging Face input directory holds that an output must not copy: the weights'
# indexes (the output writes its own) and a manifest
SKIPPED = {MANIFEST_NAME, "model.safetensors.index.json", "pytorch_model.bin.index.json"}

CHUNK = 1 << 20


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(files: dict[str, Path]) -> dict[str, dict[str, int | str]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files of an output set."""
    return {name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for name, p in files.items()}


def read_own_manifest(path: Path) -> dict | None:
    """The JSON of ``path`` if it is a regular file holding a tnsurgery manifest."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def _members(manifest: dict) -> set[str]:
    files = manifest.get("files")
    names = set(files) if isinstance(files, dict) else set()
    weights = manifest.get("weights")
    if isinstance(weights, str):
        names.add(weights)
    return names


def check_replaceable_dir(target: Path) -> None:
    """An existing ``target`` directory may be replaced only if it is an earlier
    tnsurgery output (a ``manifest.json`` of ours in it)."""
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink():
        raise OutputError(f"output {target} is a symbolic link; give a new directory")
    if not target.is_dir():
        raise OutputError(f"output {target} exists and is a file; give a new directory")
    if read_own_manifest(target / MANIFEST_NAME) is None:
        raise OutputError(
            f"output {target} exists and is a directory that is not a tnsurgery output; "
            "choose a new directory (tnsurgery replaces only its own earlier outputs)"
        )


def check_replaceable_files(targets: Iterable[Path], manifest_path: Path) -> None:
    """Every existing path among ``targets`` (a file output set whose manifest is
    ``manifest_path``) must be a file of an earlier tnsurgery output of that set."""
    targets = list(targets)
    for t in targets:
        if t.is_symlink():
            raise OutputError(f"output {t} is a symbolic link; remove it or choose another name")
        if t.is_dir():
            raise OutputError(f"output {t} is a directory; give a file name")
        if t.exists() and not t.is_file():
            raise OutputError(f"output {t} exists and is not a file; choose another name")
    existing = [t for t in targets if t.exists()]
    if not existing:
        return
    manifest = read_own_manifest(manifest_path)
    if manifest is None:
        raise OutputError(
            f"output {existing[0]} exists and is not part of an earlier tnsurgery output "
            f"(no tnsurgery manifest at {manifest_path}); remove it or choose another name"
        )
    members = _members(manifest)
    if "files" not in manifest:  # written before outputs listed their files
        members |= {t.name for t in targets}
    for t in existing:
        if t != manifest_path and t.name not in members:
            raise OutputError(
                f"output {t} exists and is not part of the earlier tnsurgery output described "
                f"by {manifest_path}; remove it or choose another name"
            )


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


def check_apart(outputs: Iterable[Path], inputs: Iterable[Path], what: str = "output") -> None:
    """Refuse an output set that would create, replace or hold any file that defines
    the input: the same path, an input inside an output directory, or an output
    inside an input directory. ``what`` names the outputs in the message."""
    ins = [(p, _resolved(p)) for p in inputs]
    for o in outputs:
        ro = _resolved(o)
        for i, ri in ins:
            if ro == ri or ri.is_relative_to(ro) or ro.is_relative_to(ri):
                how = ""
                if ro != ri:
                    how = " (it is inside)" if ri.is_relative_to(ro) else " (inside it)"
                raise OutputError(
                    f"{what} {o} would overwrite the input {i}{how}: the input, its manifest "
                    "and weights, and its directory are never written; choose another path"
                )


def link_stays_inside(link: Path, root: Path) -> bool:
    """Whether the symlink ``link`` (in the directory ``root``) resolves inside
    ``root``, or to the blobs of the Hugging Face hub cache repository ``root`` is a
    snapshot of: the links a model directory may hold."""
    return _inside(link, root) or _hub_blob(link, root)


def _inside(path: Path, root: Path) -> bool:
    return _resolved(path).is_relative_to(_resolved(root))


def _hub_blob(link: Path, root: Path) -> bool:
    """A Hugging Face hub cache snapshot links its files to ``../../blobs/``: those
    links stay inside the cached repository and are followed."""
    r = _resolved(root)
    if r.parent.name != "snapshots":
        return False
    return _resolved(link).is_relative_to(r.parent.parent / "blobs")


def copy_input_dir(src: Path, dst: Path) -> list[str]:
    """Copy the files of a Hugging Face input directory that are not weights (config,
    tokenizer, ...) into ``dst``; a symlink whose target is outside ``src`` is an
    :class:`OutputError` naming it (nothing of it is copied). Returns what was copied."""
    copied: list[str] = []
    root = src
    seen: set[Path] = set()

    def walk(here: Path, into: Path, top: bool) -> None:
        if _resolved(here) in seen:  # a link back up the tree
            raise OutputError(f"{here} links back into the input directory {root} (a cycle)")
        seen.add(_resolved(here))
        for item in sorted(here.iterdir()):
            if item.name.startswith(".") and item.is_dir():  # .git, .cache: not the model's
                continue
            if top and (item.name.endswith(HF_WEIGHT_SUFFIXES) or item.name in SKIPPED):
                continue
            if item.is_symlink() and not (_inside(item, root) or _hub_blob(item, root)):
                raise OutputError(
                    f"{item} is a symbolic link to {_resolved(item)}, outside the input "
                    f"directory {root}: tnsurgery does not copy it into the output; replace "
                    "the link by the file itself or remove it"
                )
            if item.is_dir():
                (into / item.name).mkdir()
                walk(item, into / item.name, False)
            elif item.is_file():
                shutil.copyfile(item, into / item.name)
                shutil.copystat(item, into / item.name)
                copied.append(str(item.relative_to(root)))

    walk(src, dst, True)
    return copied
