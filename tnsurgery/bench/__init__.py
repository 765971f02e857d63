"""The benchmarks' shared harness: environment stamp, interleaved timing, JSON, docs tables.

A benchmark script makes a :class:`Record` (which stamps the environment: machine,
torch, the repository's commit and whether the script or the package have
uncommitted changes), times what it compares with :func:`interleave` (every
compared callable once per round, rounds repeated, medians with their spread and
per-round ratios), adds its tables and writes one JSON file (``bench_out/NAME.json``
by default). ``python -m tnsurgery.bench render`` turns those files into the
markdown tables of ``docs/benchmarks.md``, between the markers
``<!-- bench:NAME:start -->`` / ``<!-- bench:NAME:end -->`` (a whole record) or
``<!-- bench:NAME/KEY:start -->`` / ``<!-- bench:NAME/KEY:end -->`` (one of its
tables); everything outside the markers is left as written.

Timing hygiene on a shared machine: before timing, :func:`interleave` waits (up to
``QUIET.max_wait`` seconds) for the other processes to leave the cores idle, and a
stretch of rounds during which other processes used more than ``QUIET.max_others``
of the cores (from ``/proc/stat``, minus this process's own CPU time; stretches
under 0.2 s are below its resolution and always kept) is run again, up to
``QUIET.attempts`` times. What was seen is written into the record.

The package imports only the standard library, torch and ``tnsurgery._version``
(a ground floor of docs/architecture.md): :mod:`~tnsurgery.bench.environment`,
:mod:`~tnsurgery.bench.timing`, :mod:`~tnsurgery.bench.records`,
:mod:`~tnsurgery.bench.markdown`, :mod:`~tnsurgery.bench.render`.
"""

from tnsurgery.bench.environment import (
    PACKAGE_DIR,
    describe,
    environment,
    repo_root,
    versions,
)
from tnsurgery.bench.markdown import (
    fmt,
    render_record,
    render_table,
    stamp_line,
)
from tnsurgery.bench.records import (
    DOCS,
    OUT_DIR,
    Record,
    Table,
    read,
)
from tnsurgery.bench.render import (
    main,
    render_docs,
    sections,
)
from tnsurgery.bench.timing import (
    NOISE,
    QUIET,
    Noise,
    Quiet,
    Stats,
    Timings,
    interleave,
    machine_busy,
    time_once,
    wait_idle,
    watch,
)

__all__ = [
    "DOCS",
    "NOISE",
    "Noise",
    "OUT_DIR",
    "PACKAGE_DIR",
    "QUIET",
    "Quiet",
    "Record",
    "Stats",
    "Table",
    "Timings",
    "describe",
    "environment",
    "fmt",
    "interleave",
    "machine_busy",
    "main",
    "read",
    "render_docs",
    "render_record",
    "render_table",
    "repo_root",
    "sections",
    "stamp_line",
    "time_once",
    "versions",
    "wait_idle",
    "watch",
]
