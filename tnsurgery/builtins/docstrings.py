"""English sentences from the docstrings of the running Python's standard library: the
``docstrings`` corpus of the ``sentences`` data source (:mod:`tnsurgery.builtins.corpora`).

Label-free text that every Python has, offline, of a technical kind (the library's
own prose). The sentences depend a little on the Python version (its docstrings
change); their order is fixed by a seed."""

from __future__ import annotations

import importlib
import random
import re
import warnings
from functools import lru_cache

# Standard-library modules whose docstrings are read (present in every CPython build;
# one that fails to import is skipped). Importing them runs only the standard library.
MODULES = (
    "collections json re os pathlib argparse logging unittest email http.client "
    "urllib.request csv sqlite3 decimal fractions statistics random string textwrap datetime "
    "calendar heapq bisect functools itertools operator subprocess threading asyncio socket "
    "shutil tempfile zipfile tarfile gzip pickle copy pprint inspect ast dis dataclasses enum "
    "abc contextlib io struct hashlib hmac secrets uuid base64 binascii html difflib gettext "
    "locale codecs unicodedata math cmath numbers array queue sched signal selectors mmap ssl "
    "smtplib poplib imaplib ftplib wave colorsys configparser fileinput glob fnmatch linecache "
    "traceback warnings weakref gc platform sysconfig timeit trace tracemalloc doctest pdb "
    "zoneinfo"
).split()

_SPLIT = re.compile(r"(?<=[.!?])\s+")
_PROSE = re.compile(r"^[A-Z][a-z]")
_CODE = re.compile(r"[{}<>=\[\]_|\\`]|::")


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (deprecated modules)
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # (a build without it, e.g. no ssl)
                continue
            objects = [module] + [
                getattr(module, n, None) for n in sorted(dir(module)) if not n.startswith("_")
            ]
            for obj in objects:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for s in _SPLIT.split(re.sub(r"\s+", " ", doc)):
                    if 40 <= len(s) <= 200 and _PROSE.match(s) and not _CODE.search(s):
                        found.add(s)
    return tuple(sorted(found))


def docstring_sentences(seed: int = 0) -> list[str]:
    """Every sentence once (40 to 200 characters of prose: no code), in an order fixed
    by ``seed``."""
    out = list(_sentences())
    random.Random(seed).shuffle(out)
    return out
