"""Post-surgery training: distillation, fine-tuning, schedules, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from tnsurgery import surgery
from tnsurgery.cli import cli
from tnsurgery.errors import SpecError, UserInputError
from tnsurgery.spec import Training
from tnsurgery.training.losses import kd_kl, normalized_mse, training_loss
from tnsurgery.training.steps import lr_factor as _lr_factor

ROOT = Path(__file__).resolve().parents[1]

try:
    from tests.conftest import encoder_factorize, tiny_bert_model
    from tests.models import TokenMLP
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))
    from tests.conftest import encoder_factorize, tiny_bert_model
    from tests.models import TokenMLP


def teacher_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    ).eval()


FACTORIZE = {"match": "[02]", "transform": "factorize", "params": {"rank": 6}}


def random_data(samples: int = 256) -> dict:
    return {"source": "random", "shape": [16], "samples": samples}


def cosine_to_teacher(student, teacher, x) -> float:
    with torch.no_grad():
        return float(F.cosine_similarity(student(x), teacher(x), dim=-1).mean())


def test_label_free_distillation_recovers_the_teacher():
    teacher = teacher_mlp()
    spec = {
        "rules": [FACTORIZE],
        "training": {
            "data": random_data(),
            "steps": 150,
            "lr": 1e-2,
            "batch_size": 32,
            "trainable": "surgered",
        },
    }
    x = torch.randn(512, 16)
    plain = surgery.apply(teacher, {"rules": [FACTORIZE]})
    trained = surgery.apply(teacher, spec)
    before, after = cosine_to_teacher(plain, teacher, x), cosine_to_teacher(trained, teacher, x)
    # random weights have flat spectra: rank 6 of 16/32 caps what can be recovered
    assert after > before + 0.04
    record = surgery.get_manifest(trained)["training"]
    assert record["steps"] == 150 and record["last_loss"] < record["first_loss"]
    # only the surgered layers trained; the last Linear is the teacher's
    assert torch.equal(trained[4].weight, teacher[4].weight)
    assert all(p.requires_grad for p in teacher.parameters())  # given back as it was


def test_finetune_with_labels_lowers_the_task_loss(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    y = (x[:, :5].argmax(-1)).long()
    torch.save((x, y), tmp_path / "labelled.pt")
    model = surgery.apply(teacher_mlp(), {"rules": [FACTORIZE]})
    opts = Training(
        mode="finetune",
        data={"source": "tensors", "path": str(tmp_path / "labelled.pt")},
        labels=-1,
        steps=200,
        lr=1e-2,
        trainable="all",
        eval_every=50,
        eval_data={"source": "tensors", "path": str(tmp_path / "labelled.pt")},
        metric="accuracy",
        log=str(tmp_path / "metrics.jsonl"),
    )
    result = surgery.train(model, opts)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.best_metric > 0.8 and result.best_step in (50, 100, 150, 200)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 200 and {"step", "loss", "lr"} <= set(lines[0])
    assert "accuracy" in lines[49] and lines[49]["step"] == 50


def test_logit_distillation_with_labels_mixes_by_alpha(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    y = torch.randint(0, 5, (64,))
    torch.save({"input": x, "labels": y}, tmp_path / "d.pt")
    teacher = teacher_mlp()

    class Net(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input):
            return self.inner(input)

    model = surgery.apply(Net(teacher_mlp()), {"rules": [{**FACTORIZE, "match": "inner.[02]"}]})
    opts = Training(
        data={"source": "tensors", "path": str(tmp_path / "d.pt")},
        labels="labels",
        steps=5,
        distill={"alpha": 0.3, "temperature": 2.0},
    )
    result = surgery.train(model, opts, Net(teacher))
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)


def test_loss_functions_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.softmax(t / 2, -1)
    expected = float((p * (p.log() - torch.log_softmax(s / 2, -1))).sum()) * 4
    assert float(kd_kl(s, t, 2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(normalized_mse(s, t)) == pytest.approx(
        float((s - t).square().sum() / t.square().sum())
    )


def test_schedules_with_warmup():
    base = {"data": random_data(), "steps": 110, "warmup_steps": 10}
    cos = Training(**base)
    assert _lr_factor(cos, 0) == pytest.approx(0.1) and _lr_factor(cos, 9) == 1.0
    assert _lr_factor(cos, 10) == 1.0 and _lr_factor(cos, 60) == pytest.approx(0.5)
    assert _lr_factor(cos, 110) == pytest.approx(0.0, abs=1e-12)
    step = Training(**base, scheduler="step", step_size=20, gamma=0.5)
    assert [_lr_factor(step, i) for i in (10, 29, 30, 50)] == [1.0, 1.0, 0.5, 0.25]
    assert _lr_factor(Training(**base, scheduler="constant"), 100) == 1.0


def test_observers_freeze_at_the_given_step():
    teacher = teacher_mlp()
    model = surgery.apply(
        teacher,
        {"rules": [{"match": "*", "types": ["Linear"], "transform": "qat", "params": {"bits": 4}}]},
    )
    opts = Training(data=random_data(64), steps=6, batch_size=16, freeze_observers_at=3, lr=1e-2)
    seen = []

    def progress(step, total, metrics):
        seen.append((step, bool(model[0].weight_quantizers["weight"].observer_enabled)))

    surgery.train(model, opts, teacher, progress=progress)
    assert seen == [(1, True), (2, True), (3, True), (4, False), (5, False), (6, False)]


def test_hugging_face_model_distills_on_random_token_ids():
    teacher = tiny_bert_model()
    spec = {
        "rules": [encoder_factorize(0.5)],
        "training": {
            "data": {"source": "random", "shape": [12], "vocab_size": 100, "samples": 64},
            "steps": 8,
            "batch_size": 8,
            "lr": 1e-3,
            "eval_every": 4,
            "eval_data": {"source": "random", "shape": [12], "vocab_size": 100, "samples": 16},
        },
    }
    trained = surgery.apply(teacher, spec)
    record = surgery.get_manifest(trained)["training"]
    assert [e["step"] for e in record["evals"]] == [4, 8]
    assert all(0 < e["cosine"] <= 1 for e in record["evals"])


def test_training_spec_errors_name_the_field():
    bad = {
        "rules": [FACTORIZE],
        "training": {"data": random_data(), "step": 3, "distill": {"temprature": 2}},
    }
    with pytest.raises(SpecError) as info:
        surgery.apply(teacher_mlp(), bad)
    text = str(info.value)
    assert "did you mean 'steps'" in text and "did you mean 'temperature'" in text
    with pytest.raises(UserInputError, match="needs the original model"):
        surgery.train(
            surgery.apply(teacher_mlp(), {"rules": [FACTORIZE]}), Training(data=random_data())
        )


# -------------------------------------------------------- checkpoint & resume

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from tnsurgery import surgery
    from tnsurgery.training import Training

    ckpt, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = surgery.apply(
        teacher, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 3}}]}
    )
    opts = Training(
        data={"source": "random", "shape": [16], "samples": 48}, steps=20, batch_size=8,
        lr=1e-2, checkpoint={"every": 5, "dir": ckpt}, warmup_steps=3,
    )

    def progress(step, total, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

    surgery.train(student, opts, teacher, progress=progress)
    torch.save(student.state_dict(), out)
    """
)


def _run_script(tmp_path: Path, ckpt: str, out: str, kill_at: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), ckpt, out, str(kill_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killed_run_resumes_exactly(tmp_path):
    # killed at step 12: the last checkpoint is step 10
    first = _run_script(tmp_path, str(tmp_path / "ck"), str(tmp_path / "a.pt"), 12)
    assert first.returncode != 0 and not (tmp_path / "a.pt").exists()
    assert (tmp_path / "ck" / "last.pt").exists()
    resumed = _run_script(tmp_path, str(tmp_path / "ck"), str(tmp_path / "a.pt"), -1)
    assert resumed.returncode == 0, resumed.stderr
    straight = _run_script(tmp_path, str(tmp_path / "ck2"), str(tmp_path / "b.pt"), -1)
    assert straight.returncode == 0, straight.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------- CLI


def test_cli_train_distills_a_surgered_model(tmp_path):
    torch.save(teacher_mlp(), tmp_path / "model.pt")
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {"rules": [FACTORIZE], "training": {"data": random_data(64), "steps": 20, "lr": 1e-2}}
        )
    )
    runner = CliRunner()
    r = runner.invoke(cli, ["apply", str(tmp_path / "spec.json"), str(tmp_path / "model.pt")])
    assert r.exit_code == 0, r.output
    surgered = tmp_path / "model.surgered.pt"
    # no --teacher: the model 'apply' surgered, recorded in the manifest, while unchanged
    r = runner.invoke(cli, ["train", str(tmp_path / "spec.json"), str(surgered)])
    assert r.exit_code == 0, r.output
    assert f"teacher: {(tmp_path / 'model.pt').resolve()}" in r.output
    torch.save(teacher_mlp(1), tmp_path / "model.pt")  # the original is replaced
    os.utime(tmp_path / "model.pt", ns=(10**9, 10**9))  # whatever the clock's resolution
    r = runner.invoke(cli, ["train", str(tmp_path / "spec.json"), str(surgered)])
    assert r.exit_code == 2 and "--teacher" in r.output and "has changed since" in r.output
    (tmp_path / "model.pt").unlink()
    r = runner.invoke(cli, ["train", str(tmp_path / "spec.json"), str(surgered)])
    assert r.exit_code == 2 and "is gone" in r.output
    torch.save(teacher_mlp(), tmp_path / "model.pt")
    r = runner.invoke(
        cli,
        [
            "train",
            str(tmp_path / "spec.json"),
            str(surgered),
            "--teacher",
            str(tmp_path / "model.pt"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["steps"] == 20 and (tmp_path / "model.trained.pt").exists()


def test_dropout_is_off_by_default_but_quantizers_still_observe():
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 5)).eval()
    spec = {
        "rules": [{"match": "[03]", "transform": "qat", "params": {"bits": 4, "activations": 8}}]
    }
    model = surgery.apply(teacher, spec)
    modes = []

    def progress(step, total, metrics):
        modes.append((model[1].training, model[0].input_quantizer.training))

    before = model[0].input_quantizer.max_val.clone()
    surgery.train(
        model, Training(data=random_data(64), steps=3, batch_size=16), teacher, progress=progress
    )
    assert modes == [(False, True)] * 3
    assert not torch.equal(model[0].input_quantizer.max_val, before)  # observed in training
    surgery.train(
        model,
        Training(data=random_data(64), steps=2, batch_size=16, dropout=True),
        teacher,
        progress=progress,
    )
    assert modes[-1] == (True, True)
    assert not model.training  # left in eval mode


def test_progressive_unfreezing_trains_the_last_layers_first():
    teacher = teacher_mlp()
    spec = {
        "rules": [
            {"match": "*", "types": ["Linear"], "transform": "factorize", "params": {"rank": 4}}
        ]
    }
    model = surgery.apply(teacher, spec)
    trained = []

    def progress(step, total, metrics):
        trained.append(tuple(model[i].u.requires_grad for i in (0, 2, 4)))

    opts = Training(data=random_data(64), steps=6, batch_size=16, unfreeze_stages=3, lr=1e-2)
    surgery.train(model, opts, teacher, progress=progress)
    assert (
        trained == [(False, False, True)] * 2 + [(False, True, True)] * 2 + [(True, True, True)] * 2
    )


def test_tt_hygiene_options():
    teacher = teacher_mlp()
    spec = {
        "rules": [
            {
                "match": "2",
                "transform": "tt",
                "params": {"ranks": 3, "in_factors": [4, 8], "out_factors": [4, 8]},
            }
        ]
    }
    model = surgery.apply(teacher, spec)
    layer = model[2]
    tt = {
        "clip_core_norm": 0.5,
        "normalize_cores": True,
        "reorthogonalize_every": 2,
        "log_stats_every": 2,
    }
    opts = Training(data=random_data(64), steps=3, batch_size=16, lr=1e-2, tt=tt)
    logged, orthonormal = [], []

    def progress(step, total, metrics):
        logged.append(metrics)
        first = layer.cores[0].detach().reshape(-1, layer.cores[0].shape[-1])
        orthonormal.append(torch.allclose(first.T @ first, torch.eye(first.shape[1]), atol=1e-5))

    surgery.train(model, opts, teacher, progress=progress)
    assert orthonormal == [False, True, False]  # left-canonical right after step 2
    # step 3 ends with clipping then equal norms: every core at the same norm <= 0.5
    norms = [float(c.detach().norm()) for c in layer.cores]
    assert max(norms) <= 0.5 + 1e-5 and max(norms) - min(norms) < 1e-5
    assert "tt_stats.2" in logged[1] and "tt_stats.2" not in logged[0]
    assert logged[1]["tt_stats.2"]["ranks"] == [1, 3, 1]


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    from tnsurgery import surgery
    from tnsurgery.training import Training

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = surgery.apply(
        teacher, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 3}}]}
    )
    opts = Training(
        data={"source": "random", "shape": [16], "samples": 64}, steps=6, batch_size=8, lr=1e-2
    )
    surgery.train(student, opts, teacher)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    torch.save(student.state_dict(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
    """
)


def test_two_gloo_processes_under_torchrun_end_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training moved the factors (each rank saw its own half of the batches)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    start = surgery.apply(
        teacher, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 3}}]}
    )
    assert not torch.equal(a["0.u"], start[0].u.detach())


def test_mixed_precision_trains_in_bfloat16_autocast():
    teacher = teacher_mlp()
    model = surgery.apply(teacher, {"rules": [FACTORIZE]})
    dtypes = []
    hook = model[0].register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    result = surgery.train(
        model, Training(data=random_data(64), steps=3, batch_size=16, amp=True), teacher
    )
    hook.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert model[0].u.dtype == torch.float32 and all(math.isfinite(v) for v in result.losses)


def test_loss_scaling_changes_no_update_and_survives_resume(monkeypatch, tmp_path):
    """The float16 path (a GradScaler; CUDA only) exercised on the CPU: scaling by a power
    of two and unscaling before clipping gives exactly the unscaled updates."""
    from tnsurgery.builtins import trainer as training_mod
    from tnsurgery.training import steps

    teacher = teacher_mlp()
    opts = Training(data=random_data(64), steps=6, batch_size=16, lr=1e-2, grad_clip=0.5)
    plain = surgery.apply(teacher, {"rules": [FACTORIZE]})
    surgery.train(plain, opts, teacher)
    scalers = []

    def cpu_scaler(o, m):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**12))
        return scalers[-1]

    monkeypatch.setattr(training_mod, "grad_scaler", cpu_scaler)
    scaled = surgery.apply(teacher, {"rules": [FACTORIZE]})
    ckpt = {"checkpoint": {"every": 3, "dir": str(tmp_path / "ck")}}
    with_ckpt = Training(**{**opts.model_dump(), **ckpt})

    def crash(step, total, metrics):
        if step == 4:  # after the checkpoint of step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surgery.train(scaled, with_ckpt, teacher, progress=crash)
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)["state"]
    assert saved["grad_scaler"]["scale"] == 2.0**12
    result = surgery.train(scaled, with_ckpt, teacher)
    assert result.resumed_from == 3
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert training_mod.grad_scaler.__name__ == "cpu_scaler"
    monkeypatch.undo()
    assert steps.grad_scaler(opts.model_copy(update={"amp": True}), plain) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float16_autocast_on_cuda_scales_the_loss(monkeypatch):
    from tnsurgery.training import steps as training_mod

    monkeypatch.setattr(training_mod, "cuda_amp_dtype", lambda: torch.float16)
    teacher = teacher_mlp().cuda()
    model = surgery.apply(teacher, {"rules": [FACTORIZE]})
    opts = Training(data=random_data(64), steps=5, batch_size=16, amp=True)
    assert training_mod.grad_scaler(opts, model) is not None
    result = surgery.train(model, opts, teacher)
    assert all(math.isfinite(v) for v in result.losses)


def test_tensorboard_scalars_or_a_clear_error(tmp_path):
    teacher = teacher_mlp()
    model = surgery.apply(teacher, {"rules": [FACTORIZE]})
    opts = Training(data=random_data(32), steps=2, batch_size=16, tensorboard=str(tmp_path / "tb"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserInputError, match="pip install tensorboard"):
            surgery.train(model, opts, teacher)
        return
    surgery.train(model, opts, teacher)
    assert any((tmp_path / "tb").iterdir())


def test_progressive_rank_cuts_ranks_in_stages_and_saves_the_final_shapes(tmp_path):
    import tnsurgery

    teacher = teacher_mlp()
    spec = {
        "rules": [
            {"match": "0", "transform": "factorize", "params": {"rank": 8}},
            {
                "match": "2",
                "transform": "tt",
                "params": {"ranks": 8, "in_factors": [4, 8], "out_factors": [4, 8]},
            },
        ]
    }
    model = surgery.apply(teacher, spec)
    seen = []

    def progress(step, total, metrics):
        seen.append((model[0].rank, model[2].ranks[1]))

    opts = Training(
        data=random_data(64),
        steps=6,
        batch_size=16,
        lr=1e-2,
        progressive_rank={"final": 0.25, "stages": 3},
    )
    surgery.train(model, opts, teacher, progress=progress)
    assert seen == [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] * 2
    # the truncation is the best approximation of the product (checked once by hand)
    lay = surgery.apply(teacher, {"rules": [spec["rules"][0]]})[0]
    w = (lay.u @ lay.v).detach().double()
    lay.truncate_(5)
    s = torch.linalg.svdvals(w)
    best = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    err = float((lay.u @ lay.v - w).detach().norm() / w.norm())
    assert err == pytest.approx(best, rel=1e-6)
    # saved and loaded at the final ranks
    tnsurgery.save(model, tmp_path / "m")
    again = tnsurgery.load(tmp_path / "m", teacher_mlp())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_distill_match_adds_the_outputs_of_other_modules():
    teacher = tiny_bert_model()
    spec = {"rules": [encoder_factorize(0.5)]}
    model = surgery.apply(teacher, spec)
    training = Training(
        data={"source": "random", "shape": [8], "vocab_size": 100, "samples": 16},
        steps=2,
        batch_size=8,
        distill={"match": ["encoder.layer.*"], "output": "none", "features": "surgered"},
    )
    from tnsurgery.builtins import trainer as training_mod

    captured = []
    real = training_mod.FeatureCapture

    class Spy(real):
        def __init__(self, model, names, detach):
            captured.append(list(names))
            super().__init__(model, names, detach)

    training_mod.FeatureCapture = Spy
    try:
        result = surgery.train(model, training, teacher)
    finally:
        training_mod.FeatureCapture = real
    assert {"encoder.layer.0", "encoder.layer.1"} <= set(captured[0])
    assert len(captured[0]) == 2 + 12  # the blocks and the 12 surgered Linears
    assert all(math.isfinite(v) for v in result.losses)


def test_training_gives_the_teacher_and_the_student_back_as_they_were():
    teacher = teacher_mlp()
    teacher.train()
    teacher[4].weight.requires_grad_(False)  # a user's own choice, kept
    spec = {
        "rules": [FACTORIZE],
        "training": {"data": random_data(64), "steps": 3, "batch_size": 16},
    }
    student = surgery.apply(teacher, spec)
    assert teacher.training and all(m.training for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == [True] * 4 + [False, True]
    # the student's flags are what they were before training (its copy of the frozen one)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    assert flags.pop("4.weight") is False and all(flags.values())


def test_a_failing_setup_leaves_the_callers_model_untouched(tmp_path):
    teacher = teacher_mlp()
    teacher.train()
    spec = {
        "rules": [FACTORIZE],
        "training": {
            "data": random_data(32),
            "steps": 2,
            "log": str(tmp_path / "no" / "dir" / "x.jsonl"),
        },
    }
    with pytest.raises(UserInputError, match="cannot write the log"):
        surgery.apply(teacher, spec)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(not m._forward_hooks for m in teacher.modules())


def test_progressive_rank_resumes_exactly_across_a_cut(tmp_path):
    def run(ckpt, stop_at=None):
        torch.manual_seed(0)
        teacher = teacher_mlp()
        model = surgery.apply(
            teacher, {"rules": [{"match": "0", "transform": "factorize", "params": {"rank": 8}}]}
        )
        opts = Training(
            data=random_data(64),
            steps=6,
            batch_size=16,
            lr=1e-2,
            progressive_rank={"final": 0.25, "stages": 3},
            checkpoint={"every": 1, "dir": str(ckpt)},
        )

        def progress(step, total, metrics):
            if step == stop_at:
                raise KeyboardInterrupt

        try:
            surgery.train(model, opts, teacher, progress=progress)
        except KeyboardInterrupt:
            return None
        return model

    assert run(tmp_path / "a", stop_at=3) is None  # stopped after a cut (step 2)
    resumed = run(tmp_path / "a")
    straight = run(tmp_path / "b")
    assert resumed[0].rank == straight[0].rank == 2
    a, b = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inconsistent_training_options_are_spec_errors():
    bad = {
        "rules": [FACTORIZE],
        "training": {
            "mode": "finetune",
            "data": random_data(),
            "eval_every": 10,
            "scheduler": "plateau",
        },
    }
    with pytest.raises(SpecError) as info:
        surgery.apply(teacher_mlp(), bad)
    text = str(info.value)
    assert "needs 'labels'" in text and "'eval_every' needs 'eval_data'" in text


def test_resume_refuses_another_recipe_and_trims_the_log(tmp_path):
    teacher = teacher_mlp()
    log = tmp_path / "m.jsonl"

    def opts(lr, steps=4):
        return Training(
            data=random_data(64),
            steps=steps,
            batch_size=16,
            lr=lr,
            checkpoint={"every": 2, "dir": str(tmp_path / "ck")},
            log=str(log),
        )

    model = surgery.apply(teacher, {"rules": [FACTORIZE]})

    def stop(step, total, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surgery.train(model, opts(1e-2), teacher, progress=stop)
    assert len(log.read_text().splitlines()) == 3  # steps 1-3; the checkpoint is at 2
    with pytest.raises(UserInputError, match="other options"):
        surgery.train(model, opts(5e-3), teacher)
    result = surgery.train(model, opts(1e-2, steps=6), teacher)  # longer is the same recipe
    assert result.resumed_from == 2
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_distillation_never_compares_padded_positions():
    from tnsurgery.training import losses as training_mod

    teacher = TokenMLP().eval()
    rule = {"match": "fc*", "transform": "factorize", "params": {"rank": 3}}
    student = surgery.apply(teacher, {"rules": [rule]})
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 2:] = 0
    mask[2, 4:] = 0
    opts = Training(data=random_data(), steps=1)
    names = ["fc1", "fc2"]
    losses = []
    for pad in (0, 9, 31):  # whatever the padded positions hold
        ids = ids.clone()
        ids[mask == 0] = pad
        s_cap = training_mod.FeatureCapture(student, names, detach=False)
        t_cap = training_mod.FeatureCapture(teacher, names, detach=True)
        batch = {"input_ids": ids, "attention_mask": mask}
        loss, parts = training_loss(opts, student, teacher, batch, None, s_cap, t_cap)
        s_cap.remove()
        t_cap.remove()
        losses.append((float(loss.detach()), parts["feature_loss"]))
        # by hand, on the real tokens only
        keep = mask.bool()
        with torch.no_grad():
            out, ref = student(ids)[keep], teacher(ids)[keep]
            h, h_ref = student.fc1(student.emb(ids))[keep], teacher.fc1(teacher.emb(ids))[keep]
        by_hand = normalized_mse(out, ref)
        feature = (normalized_mse(h, h_ref) + normalized_mse(out, ref)) / 2
        assert parts["feature_loss"] == pytest.approx(float(feature), rel=1e-5)
        assert float(loss.detach()) == pytest.approx(float(by_hand + feature), rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == losses[2]


def test_order_distill_then_compress_trains_the_dense_model_first(tmp_path):
    teacher = teacher_mlp(0)
    dense = teacher_mlp(1)  # another model of the same shape: the one to compress
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    training = {"data": random_data(256), "steps": 150, "lr": 1e-2, "batch_size": 64}
    spec = {"rules": [FACTORIZE], "training": {**training, "order": "distill_then_compress"}}
    before = cosine_to_teacher(dense, teacher, x)
    small = surgery.apply(dense, spec, teacher=teacher)
    manifest = surgery.get_manifest(small)
    assert manifest["training"]["order"] == "distill_then_compress"
    assert manifest["training"]["steps"] == 150
    assert manifest["spec"]["training"]["order"] == "distill_then_compress"
    # the dense model learned the teacher, then was compressed: the result is close to
    # the teacher, and the factors come from the trained weights, not the original ones
    assert cosine_to_teacher(small, teacher, x) > before + 0.6  # -0.15 -> 0.80 here
    assert not torch.equal(dense[0].weight, teacher[0].weight)  # the input is untouched
    assert torch.equal(dense[0].weight, teacher_mlp(1)[0].weight)
    # every parameter trained, the non-surgered layer too
    assert not torch.equal(small[4].weight, dense[4].weight)
    # the default order, with the surgered layers alone training, trains the factors only
    surgered = {**training, "trainable": "surgered"}
    after = surgery.apply(dense, {"rules": [FACTORIZE], "training": surgered}, teacher=teacher)
    assert torch.equal(after[4].weight, dense[4].weight)
    assert cosine_to_teacher(after, teacher, x) > before


def test_order_distill_then_compress_needs_another_teacher_and_no_inplace(tmp_path):
    model = teacher_mlp(0)
    spec = {
        "rules": [FACTORIZE],
        "training": {"data": random_data(64), "steps": 5, "order": "distill_then_compress"},
    }
    with pytest.raises(UserInputError, match="needs a teacher other than the model"):
        surgery.apply(model, spec)
    with pytest.raises(UserInputError, match="inplace=True"):
        surgery.apply(model, spec, inplace=True, teacher=teacher_mlp(1))
    assert torch.equal(model[0].weight, teacher_mlp(0)[0].weight)
    bad = {**spec, "training": {**spec["training"], "progressive_rank": {"final": 0.5}}}
    with pytest.raises(SpecError, match="needs order 'compress_then_distill'"):
        surgery.apply(model, bad, teacher=teacher_mlp(1))
    # the command line takes the teacher too
    torch.save(model, tmp_path / "model.pt")
    torch.save(teacher_mlp(1), tmp_path / "teacher.pt")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["apply", str(tmp_path / "spec.json"), str(tmp_path / "model.pt")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--teacher" in r.output
    r = CliRunner().invoke(cli, [*args, "--teacher", str(tmp_path / "teacher.pt")])
    assert r.exit_code == 0, r.output


def test_cosine_output_loss_compares_mean_pooled_real_tokens():

    teacher = TokenMLP().eval()
    rule = {"match": "fc*", "transform": "factorize", "params": {"rank": 2}}
    student = surgery.apply(teacher, {"rules": [rule]})
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 2:] = 0
    opts = Training(data=random_data(), distill={"output": "cosine", "features": "none"})
    batch = {"input_ids": ids, "attention_mask": mask}
    loss, _ = training_loss(opts, student, teacher, batch, None, None, None)
    with torch.no_grad():
        m = mask.unsqueeze(-1).float()
        a = (student(ids) * m).sum(1) / m.sum(1)
        b = (teacher(ids) * m).sum(1) / m.sum(1)
    expected = (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss.detach()) > 1e-4
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.fc1.parameters())


def test_a_teacher_that_would_not_be_used_is_an_error():
    model = teacher_mlp(0)
    with pytest.raises(UserInputError, match="a teacher was given but the spec does not distill"):
        surgery.apply(model, {"rules": [FACTORIZE]}, teacher=teacher_mlp(1))


def wide_teacher() -> nn.Sequential:
    """Another architecture than teacher_mlp (for --teacher-arch)."""
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))


def test_cli_teacher_of_another_architecture(tmp_path):
    torch.save(teacher_mlp(0), tmp_path / "model.pt")
    torch.save(wide_teacher().state_dict(), tmp_path / "teacher.pt")
    spec = {
        "rules": [FACTORIZE],
        "training": {"data": random_data(64), "steps": 5, "order": "distill_then_compress"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["apply", str(tmp_path / "spec.json"), str(tmp_path / "model.pt")]
    args += ["--teacher", str(tmp_path / "teacher.pt")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = CliRunner().invoke(cli, [*args, "--teacher-arch", "tests.test_training:wide_teacher"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "model.surgered.pt").exists()


def test_the_default_trains_every_parameter_with_a_tenth_of_warmup():
    """The minimal section's defaults (chosen by benchmarks/bench_defaults.py): every
    parameter trains, lr 3e-4, warmup over a tenth of the steps; 'surgered' when
    unfreeze_stages is set (it unfreezes surgered layers)."""
    from tnsurgery.spec.training import Training

    t = Training.model_validate({"data": random_data(), "steps": 300})
    assert (t.trainable, t.lr, t.warmup_steps) == ("all", 3e-4, 30)
    staged = Training.model_validate({"data": random_data(), "unfreeze_stages": 2})
    assert staged.trainable == "surgered"
    explicit = Training.model_validate({"data": random_data(), "warmup_steps": 0})
    assert explicit.warmup_steps == 0
    teacher = teacher_mlp()
    spec = {"rules": [FACTORIZE], "training": {"data": random_data(64), "steps": 5}}
    trained = surgery.apply(teacher, spec)
    assert not torch.equal(trained[4].weight, teacher[4].weight)  # not surgered, trained
