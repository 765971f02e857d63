"""Red-team review, round 2: spec-named training files read with bounded memory and
refused unless tnsurgery's own (an empty log, a TensorBoard directory of other
files), and untrusted models whose weights are not real floating point (int,
complex, meta) refused in the plan rather than crashing."""

from __future__ import annotations

import json
import os
import resource
import sys

import pytest
import torch
from torch import nn

from tnsurgery import surgery
from tnsurgery.errors import MatchError, UserInputError
from tnsurgery.spec import Training
from tnsurgery.training.checkpoints import MAX_LOG_LINE, check_own_log, trim_log
from tnsurgery.training.steps import check_own_tensorboard

from .helpers import RANK4, invoke, plain_mlp, refused

DATA = {"source": "random", "shape": [16], "samples": 16}


def _rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)


# ------------------------------------------------------------ 1. bounded log reads


def test_a_huge_sparse_log_is_refused_with_bounded_memory(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "wb") as f:
        os.truncate(f.fileno(), 1 << 30)  # 1 GiB of zeros, no newline, nothing on disk
    before = _rss_bytes()
    with pytest.raises(UserInputError, match="not a tnsurgery metrics log"):
        check_own_log(log)
    with pytest.raises(UserInputError, match="not a tnsurgery metrics log"):
        trim_log(str(log), 1)
    assert _rss_bytes() - before < 200 * 2**20
    assert log.stat().st_size == 1 << 30  # left alone


def test_a_line_longer_than_the_bound_is_not_ours(tmp_path):
    log = tmp_path / "train.log"
    pad = "x" * MAX_LOG_LINE
    log.write_text(_lines(1) + json.dumps({"step": 2, "pad": pad}) + "\n")
    with pytest.raises(UserInputError, match="not a tnsurgery metrics log"):
        check_own_log(log)
    log.write_text(_lines(1, 2))
    check_own_log(log)  # ours


def test_trim_log_streams_and_rewrites_atomically(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(_lines(1, 2, 3, 4) + "\n")
    inode = log.stat().st_ino
    trim_log(str(log), 2)
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [1, 2]
    assert log.stat().st_ino != inode  # a new file renamed into place, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.log"]  # no temp left
    trim_log(str(log), 0)  # nothing kept: no empty log left behind
    assert not log.exists()


def test_trim_log_refuses_what_is_not_ours_and_leaves_it(tmp_path):
    log = tmp_path / "notes.txt"
    log.write_text(_lines(1) + "my notes\n")
    with pytest.raises(UserInputError, match="not a tnsurgery metrics log"):
        trim_log(str(log), 0)
    assert log.read_text() == _lines(1) + "my notes\n"


# -------------------------------------------------------------- 2. an empty log


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_existing_empty_log_is_refused(tmp_path, content):
    log = tmp_path / "train.log"
    log.write_text(content)
    with pytest.raises(UserInputError, match="remove it or choose another file"):
        check_own_log(log)
    spec = {"rules": RANK4["rules"], "training": {"data": DATA, "steps": 1, "log": str(log)}}
    with pytest.raises(UserInputError, match="empty"):
        surgery.apply(plain_mlp(), spec)
    assert log.read_text() == content


def test_the_builtin_trainer_leaves_no_empty_log_and_reruns_append(tmp_path):
    log = tmp_path / "train.log"
    teacher = plain_mlp()
    model = surgery.apply(teacher, RANK4)
    ckpt = {"every": 1, "dir": str(tmp_path / "ck")}

    def opts(steps):
        return Training(data=DATA, steps=steps, batch_size=8, log=str(log), checkpoint=ckpt)

    surgery.train(model, opts(2), teacher)
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [1, 2]
    # resumed at its end: nothing to do, the log kept as it was
    surgery.train(model, opts(2), teacher)
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [1, 2]
    surgery.train(model, opts(3), teacher)  # a longer rerun appends
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [1, 2, 3]


def test_a_run_that_writes_no_line_removes_the_log_it_created(tmp_path):
    log = tmp_path / "train.log"
    teacher = plain_mlp()
    model = surgery.apply(teacher, RANK4)
    opts = Training(data={"source": "random", "shape": [3], "samples": 8}, steps=2, log=str(log))
    with pytest.raises(RuntimeError, match="shapes"):  # the first step fails, after setup
        surgery.train(model, opts, teacher)
    assert not log.exists()
    opts = Training(data=DATA, steps=1, batch_size=8, log=str(log))
    surgery.train(model, opts, teacher)  # the rerun works
    assert len(log.read_text().splitlines()) == 1


# ------------------------------------------------------- 3. the tensorboard dir


def test_a_tensorboard_dir_must_be_new_or_hold_only_event_files(tmp_path):
    check_own_tensorboard(tmp_path / "new")  # new: fine
    board = tmp_path / "tb"
    board.mkdir()
    check_own_tensorboard(board)  # empty: fine
    (board / "events.out.tfevents.123.host.1.0").write_bytes(b"\0")
    check_own_tensorboard(board)  # ours: fine
    (board / "thesis.tex").write_text("precious")
    with pytest.raises(UserInputError, match=f"tensorboard dir {board}.*thesis.tex"):
        check_own_tensorboard(board)
    (board / "thesis.tex").unlink()
    (board / "events.out.tfevents.sub").mkdir()  # not a file
    with pytest.raises(UserInputError, match="not TensorBoard event files"):
        check_own_tensorboard(board)


def test_a_tensorboard_symlink_or_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UserInputError, match="is not a directory"):
        check_own_tensorboard(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is not a directory"):
        check_own_tensorboard(tmp_path / "file")
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    (target / "events.out.tfevents.1").symlink_to(outside)  # an event name, but a link
    with pytest.raises(UserInputError, match="not TensorBoard event files"):
        check_own_tensorboard(target)


def test_training_refuses_a_foreign_tensorboard_dir_before_any_step(tmp_path):
    board = tmp_path / "home"
    board.mkdir()
    (board / ".bashrc").write_text("export PATH=/usr/bin\n")
    spec = {
        "rules": RANK4["rules"],
        "training": {"data": DATA, "steps": 1, "tensorboard": str(board)},
    }
    with pytest.raises(UserInputError, match="not TensorBoard event files"):
        surgery.apply(plain_mlp(), spec)
    assert sorted(p.name for p in board.iterdir()) == [".bashrc"]


# ------------------------------------------- 4. weights that are not real floats


def _int_linear() -> nn.Linear:
    layer = nn.Linear(16, 32)
    layer.weight = nn.Parameter(torch.ones(32, 16, dtype=torch.int64), requires_grad=False)
    return layer


MODELS = {
    "int64": (_int_linear, "torch.int64"),
    "complex64": (lambda: nn.Linear(16, 32, dtype=torch.complex64), "torch.complex64"),
    "meta": (lambda: nn.Linear(16, 32, device="meta"), "meta device"),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weights_that_are_not_real_floats_are_refused_in_the_plan(kind):
    make, words = MODELS[kind]
    model = nn.Sequential(make())
    result = surgery.plan(model, RANK4)
    (target,) = result.targets
    assert target.status == "refuse" and words in target.reason, target.reason
    if kind != "meta":
        with pytest.raises(MatchError, match="nothing was replaced"):
            surgery.apply(model, RANK4)
        out = surgery.apply(model, RANK4, allow_empty=True)
        assert type(out[0]) is nn.Linear  # kept as it was, not silently made real


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cli_plan_and_apply_never_crash_on_such_weights(tmp_path, kind):
    make, words = MODELS[kind]
    torch.save(nn.Sequential(make()), tmp_path / "m.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(RANK4))
    r = invoke("plan", spec, tmp_path / "m.pt")
    if kind == "meta":  # a pickle of meta tensors holds no values: refused when read
        refused(r, "meta device")
        refused(invoke("apply", spec, tmp_path / "m.pt", "-o", tmp_path / "out.pt"), "meta")
        return
    assert r.exit_code == 0 and "Internal error" not in r.output, r.output
    assert "refuse" in r.output
    r = invoke("apply", spec, tmp_path / "m.pt", "-o", tmp_path / "out.pt")
    if r.exit_code == 2:
        refused(r)
    else:
        assert r.exit_code == 0 and "Internal error" not in r.output, r.output


def test_half_precision_weights_are_still_factorized():
    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.bfloat16))
    (target,) = surgery.plan(model, RANK4).targets
    assert target.status == "replace"
