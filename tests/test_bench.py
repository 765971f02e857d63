"""tnsurgery.bench: interleaved timing, statistics, the record's JSON, docs rendering, stamp."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tnsurgery import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """No waiting for idle cores in tests (the machine may be busy with other tests)."""
    monkeypatch.setattr(bench.QUIET, "enabled", False)
    bench.NOISE.clear()


# ----------------------------------------------------------------------------- statistics


def test_stats_of_known_values():
    s = bench.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.min, s.max, s.q1, s.q3, s.n) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert s.iqr == 2.0 and s.spread == pytest.approx(1 / 3)
    assert float(s) == 3.0
    assert s.scaled(1e3).median == 3000.0 and s.scaled(1e3).n == 5
    one = bench.Stats.of([0.25])
    assert (one.median, one.q1, one.q3, one.spread) == (0.25, 0.25, 0.25, 0.0)
    with pytest.raises(ValueError):
        bench.Stats.of([])


def test_timings_ratio_is_per_round_and_total_sums_rounds():
    t = bench.Timings({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0], "c": [1.0, 1.0]})
    assert t.ratio("a", "b").median == 1.0  # rounds: 0.5, 1, 2
    assert (t.ratio("a", "b").min, t.ratio("a", "b").max) == (0.5, 2.0)
    assert t.ms("b").median == 2000.0 and t.s("a").median == 2.0
    assert t.total(["a", "b"]).median == 4.0  # 3, 4, 6
    assert t.ratio(["a", "b"], "b").median == 2.0
    assert t.ratio("a", "c").n == 2  # over the rounds both ran
    assert t.to_dict()["a"]["median"] == 2000.0


# ----------------------------------------------------------------------------- interleaving


def test_interleave_sleeps_medians_and_ratio():
    t = bench.interleave(
        {"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.008)},
        repeats=9,
        warmup=1,
    )
    assert len(t.samples["short"]) == len(t.samples["long"]) == 9
    short, long_ = t.ms("short"), t.ms("long")
    assert 1.9 <= short.median < long_.median
    assert short.min <= short.q1 <= short.median <= short.q3 <= short.max
    assert 2.0 <= t.ratio("long", "short").median <= 4.5  # 4 less the sleeps' overshoot


def test_interleave_matmul_one_vs_four_times():
    a = torch.randn(192, 192)

    def times(n):
        def f():
            for _ in range(n):
                a @ a
            return n

        return f

    with torch.inference_mode():
        t = bench.interleave({"1x": times(1), "4x": times(4)}, repeats=21, warmup=3)
    assert t.results == {"1x": 1, "4x": 4}
    assert t.ms("4x").median > t.ms("1x").median
    assert 1.8 <= t.ratio("4x", "1x").median <= 8.0  # about 4 on a quiet machine


def test_interleave_rotates_the_first_callable():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    t = bench.interleave(fns, repeats=6, warmup=0)
    assert calls[0::3] == ["a", "b", "c", "a", "b", "c"]  # round r starts at callable r mod 3
    assert sorted(calls[3:6]) == ["a", "b", "c"]  # every callable once per round
    assert all(len(v) == 6 for v in t.samples.values())


def test_interleave_budget_stops_a_slow_callable():
    fns = {"fast": lambda: None, "slow": lambda: time.sleep(0.03)}
    t = bench.interleave(fns, repeats=6, warmup=0, budget_s=0.05)
    assert len(t.samples["fast"]) == 6
    assert 2 <= len(t.samples["slow"]) <= 3  # stopped once its calls added up to 0.05 s
    assert t.ratio("slow", "fast").n == len(t.samples["slow"])


def test_interleave_reruns_a_disturbed_stretch(monkeypatch):
    class FakeWatch:
        made = 0

        def __init__(self, label="", record=True):
            FakeWatch.made += 1
            self.others = 0.9 if FakeWatch.made == 1 else 0.0  # only the first is disturbed
            self.seconds = 0.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(bench.timing, "watch", FakeWatch)
    monkeypatch.setattr(bench.QUIET, "enabled", True)
    monkeypatch.setattr(bench.timing, "wait_idle", lambda: None)
    t = bench.interleave({"x": lambda: time.sleep(0.3)}, repeats=2, warmup=0, label="noisy")
    assert bench.NOISE.reruns == 1
    assert len(t.samples["x"]) == 2  # the disturbed round was dropped and run again
    assert [label for label, _ in bench.NOISE.shares] == ["noisy", "noisy"]
    assert bench.NOISE.summary()["noisy"] == []


def test_watch_measures_wall_time():
    with bench.watch("sleep") as w:
        time.sleep(0.25)
    assert 0.24 <= w.seconds < 2.0
    assert w.others is None or 0.0 <= w.others <= 1.0
    secs, res = bench.time_once(lambda: 7)
    assert res == 7 and secs >= 0


# ----------------------------------------------------------------------------- records


def sample_record(name: str = "demo", quick: bool = False) -> bench.Record:
    rec = bench.Record(name, script=__file__, quick=quick, argv=["bench_demo.py", "--x", "1"])
    rec.note("setup: a demo")
    t = rec.table("speed", "1. Speed", ["case", "ms", "ratio", "err"], formats={"err": ".4f"})
    t.add("small", bench.Stats.of([1.0, 1.2, 1.1]), 0.5, 0.12345678)
    t.add("nan", None, float("nan"), (1, 2))
    t.note("a note with | a pipe")
    t.goal("ratio < 1", True, "small: 0.5x")
    t.goal("err < 0.1", False, "small: 0.1235")
    t2 = rec.table("other", "2. Other", ["k", "v"])
    t2.add("a", 3)
    return rec


def test_record_json_round_trip(tmp_path):
    rec = sample_record()
    path = rec.write(tmp_path / "out" / "demo.json")
    data = bench.read(path)
    assert json.loads(path.read_text()) == data
    assert data["name"] == "demo" and data["quick"] is False
    assert data["command"] == "python bench_demo.py --x 1"
    speed = data["tables"][0]
    assert speed["key"] == "speed" and speed["columns"] == ["case", "ms", "ratio", "err"]
    cell = speed["rows"][0][1]
    assert cell["median"] == pytest.approx(1.1) and cell["n"] == 3
    assert speed["rows"][1] == ["nan", None, None, [1, 2]]  # NaN -> null, tuple -> list
    assert speed["goals"] == [
        {"goal": "ratio < 1", "met": True, "result": "small: 0.5x"},
        {"goal": "err < 0.1", "met": False, "result": "small: 0.1235"},
    ]
    assert set(data["stamp"]) >= {"commit", "package_dirty", "script", "script_commit", "cpu"}
    assert data["noise"]["stretches"] == 0
    with pytest.raises(ValueError):
        rec.table("speed", "again", ["x"])
    with pytest.raises(ValueError):
        rec.tables[0].add("too", "few")


def test_default_path_and_quick_name():
    assert sample_record().default_path().name == "demo.json"
    quick = sample_record(quick=True).default_path()
    assert quick.name == "demo-quick.json" and quick.parent.name == bench.OUT_DIR


def test_render_record_and_table():
    data = sample_record().to_dict()
    text = bench.render_record(data)
    assert text.startswith("_Generated from `python bench_demo.py --x 1`")
    assert "setup: a demo" in text and "### 1. Speed" in text and "### 2. Other" in text
    assert "| case | ms | ratio | err |" in text
    assert re.search(r"\| small \| 1\.100 ±\d+% \| 0\.500 \| 0\.1235 \|", text)
    assert "| nan | - | - | [1, 2] |" in text
    assert "a note with \\| a pipe" not in text and "- a note with | a pipe" in text
    assert "[goal: ratio < 1: met]" in text and "[goal: err < 0.1: **MISSED**]" in text
    one = bench.render_record(data, "other")
    assert "**2. Other**" in one and "1. Speed" not in one and "setup: a demo" not in one
    with pytest.raises(KeyError):
        bench.render_record(data, "missing")
    quick = bench.render_record(sample_record(quick=True).to_dict())
    assert quick.startswith("**Quick smoke run")


def test_fmt():
    assert bench.fmt(None) == "-"
    assert bench.fmt(1234.5) == "1234" or bench.fmt(1234.5) == "1235"
    assert bench.fmt(12.34) == "12.3" and bench.fmt(0.5) == "0.500"
    assert bench.fmt(0.001234) == "1.23e-03" and bench.fmt(0.5, ".2f") == "0.50"
    assert bench.fmt(True) == "yes" and bench.fmt(7) == "7"
    assert bench.fmt({"median": 2.0, "q1": 1.9, "q3": 2.1, "n": 5}) == "2.000 ±5%"
    assert bench.fmt({"median": 2.0, "q1": 2.0, "q3": 2.0, "n": 1}) == "2.000"
    table = {"columns": ["n", "x", "y"], "rows": [[3, 0.25, 0.125]], "formats": {"*": ".1f"}}
    table["formats"]["y"] = ".3f"
    assert "| 3 | 0.2 | 0.125 |" in bench.render_table(table)  # "*": the other floats only


# ----------------------------------------------------------------------------- docs


DOC = """# Benchmarks

Prose before, kept exactly.  Trailing spaces too.

<!-- bench:demo:start -->
old figures of demo
<!-- bench:demo:end -->

Between the sections: `<!-- bench:demo:start -->` inline is not a marker.

<!-- bench:demo/other:start -->
old table
<!-- bench:demo/other:end -->

<!-- bench:unknown:start -->
left alone
<!-- bench:unknown:end -->

<!-- bench:demo/nosuch:start -->
also left alone
<!-- bench:demo/nosuch:end -->
Prose after.
"""


def test_render_docs_replaces_only_the_marked_sections():
    data = sample_record().to_dict()
    new, done, kept = bench.render_docs(DOC, [data])
    assert done == ["demo", "demo/other"]
    assert kept == ["unknown", "demo/nosuch"]
    assert "old figures of demo" not in new and "old table" not in new
    assert "left alone" in new and "also left alone" in new
    outside = re.sub(r"(?s)<!-- bench:([\w./-]+):start -->\n.*?<!-- bench:\1:end -->", "@", new)
    expected = re.sub(r"(?s)<!-- bench:([\w./-]+):start -->\n.*?<!-- bench:\1:end -->", "@", DOC)
    assert outside == expected  # everything outside the markers is byte for byte the same
    whole = new.split("<!-- bench:demo:start -->\n")[1].split("<!-- bench:demo:end -->")[0]
    assert whole == bench.render_record(data)
    assert "1. Speed" in whole and "_Generated from" in whole
    one = new.split("<!-- bench:demo/other:start -->\n")[1].split("<!-- bench:demo/other:end")[0]
    assert "**2. Other**" in one and "1. Speed" not in one and "_Generated from" in one
    again, _, _ = bench.render_docs(new, [data])
    assert again == new  # idempotent


def test_render_docs_takes_each_table_from_the_last_record_that_has_it():
    first = sample_record().to_dict()
    part = bench.Record("demo", script=__file__, argv=["part.py"])
    part.table("other", "2. Other, again", ["k", "v"]).add("b", 4)
    new, done, _ = bench.render_docs(DOC, [first, part.to_dict()])
    one = new.split("<!-- bench:demo/other:start -->\n")[1].split("<!-- bench:demo/other:end")[0]
    assert "2. Other, again" in one and "`python part.py`" in one
    whole = new.split("<!-- bench:demo:start -->\n")[1].split("<!-- bench:demo:end -->")[0]
    assert "1. Speed" not in whole  # the whole-record section: the last record named demo


def test_render_command_rewrites_a_copy_of_the_docs(tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(DOC)
    path = sample_record().write(tmp_path / "demo.json")
    args = ["render", str(path), "--docs", str(docs)]
    assert bench.main([*args, "--check"]) == 1  # out of date, nothing written
    assert docs.read_text() == DOC
    assert bench.main(args) == 0
    assert "_Generated from" in docs.read_text()
    assert bench.main([*args, "--check"]) == 0
    assert "2 section(s)" in capsys.readouterr().out
    quick = sample_record(quick=True).write(tmp_path / "demo-quick.json")
    assert bench.main(["render", str(quick), "--docs", str(docs), "--strict"]) == 2
    assert bench.main(["show", str(path), "--key", "other"]) == 0
    assert "**2. Other**" in capsys.readouterr().out


def test_the_docs_markers_are_well_formed():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    names = bench.sections(text)
    assert "bench_factorize" in names and "bench_tensor/paths" in names
    marker_lines = [ln for ln in text.splitlines() if re.fullmatch(r"<!-- bench:.* -->", ln)]
    assert len(marker_lines) == 2 * len(names)  # every marker line opens or closes a section


# ----------------------------------------------------------------------------- stamp


def test_environment_stamp_has_the_commit_fields():
    st = bench.environment(__file__)
    for key in ("date", "cpu", "cores", "torch", "threads", "python", "load_average", "env"):
        assert key in st
    assert st["torch"] == torch.__version__ and st["cores"] >= 1
    if shutil.which("git") is None or bench.repo_root() is None:
        pytest.skip("not in a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", st["commit"])
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert st["commit"] == head
    assert isinstance(st["package_dirty"], bool)
    assert st["script"] == "tests/test_bench.py"
    assert isinstance(st["script_dirty"], bool) and isinstance(st["script_dir_dirty"], bool)
    assert st["script_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", st["script_commit"])
    line = bench.describe(st)
    assert f"commit {head[:10]}" in line and "tests/test_bench.py" in line
    assert not math.isnan(st["load_average"][0])
