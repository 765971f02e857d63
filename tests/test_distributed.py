"""Training with FSDP (``"distributed": "fsdp"``): two CPU processes on gloo under
``torchrun`` compute what one process computes (losses, weights), resume exactly,
write the single-process checkpoint files (each resumes the other's), print and
write from rank 0 alone, and end together when one process fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tnsurgery.builtins.trainer as loop
from tnsurgery import surgery
from tnsurgery.cli import cli
from tnsurgery.errors import SpecError, UserInputError
from tnsurgery.spec import Training, load_spec
from tnsurgery.training.distributed import (
    indexed_optimizer_state,
    named_optimizer_state,
    rank_share,
    shard_units,
)
from tnsurgery.training.losses import FeatureCapture, training_loss
from tnsurgery.training.steps import split_labels

ROOT = Path(__file__).resolve().parents[1]

try:
    from tests.models import TokenMLP
except ImportError:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))
    from tests.models import TokenMLP
STEPS = 6


class Blocks(nn.Module):
    """A residual MLP whose blocks sit in an ``nn.ModuleList`` (FSDP's units)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.out(x)


def models() -> tuple[nn.Module, nn.Module]:
    """The teacher, and the student surgery makes of it (the same on every process)."""
    torch.manual_seed(0)
    teacher = Blocks().eval()
    rules = [{"match": "blocks.*", "transform": "factorize", "params": {"rank": 6}}]
    return teacher, surgery.apply(teacher, {"rules": rules})


def options(ckpt: str | None = None) -> Training:
    """Distillation in global batches of 7 (slices of 3 and 4 over two processes; the
    last batch of the data, 4), evaluated and checkpointed every 3 steps."""
    return Training(
        data={"source": "random", "shape": [16], "samples": 60},
        steps=STEPS,
        batch_size=7,
        lr=1e-2,
        eval_every=3,
        eval_data={"source": "random", "shape": [16], "samples": 16},
        checkpoint={"dir": ckpt, "every": 3} if ckpt else None,
        distributed="fsdp",
    )


class Interrupt(Exception):
    """Stops a run between two steps, on every process."""


@contextlib.contextmanager
def stop_at(step: int) -> Iterator[None]:
    """Interrupt the built-in loop as ``step`` (0-based) begins."""
    real = loop.lr_factor

    def factor(opts, at):
        if at == step:
            raise Interrupt
        return real(opts, at)

    loop.lr_factor = factor
    try:
        yield
    finally:
        loop.lr_factor = real


FSDP_SCRIPT = textwrap.dedent(
    """
    import shutil, sys
    import torch
    import torch.distributed as dist
    from tnsurgery import surgery
    from tests.test_distributed import Interrupt, models, options, stop_at

    work = sys.argv[1]

    def save(student, result, name):
        torch.save(
            {"state": student.state_dict(), "losses": result.losses, "evals": result.evals},
            f"{work}/{name}{dist.get_rank()}.pt",
        )

    teacher, student = models()  # the loop joins the process group itself
    save(student, surgery.train(student, options(f"{work}/fsdp"), teacher), "full")
    teacher, student = models()
    try:
        with stop_at(3):
            surgery.train(student, options(f"{work}/cut"), teacher)
    except Interrupt:
        pass
    if dist.get_rank() == 0:  # the checkpoint of step 3, for a single-process resume
        shutil.copytree(f"{work}/cut", f"{work}/cut3")
    dist.barrier()
    teacher, student = models()
    save(student, surgery.train(student, options(f"{work}/cut"), teacher), "resumed")
    teacher, student = models()  # a single-process run's checkpoint of step 3
    save(student, surgery.train(student, options(f"{work}/single3"), teacher), "from_single")
    dist.destroy_process_group()
    """
)


def torchrun(
    args: list[str], tmp_path: Path, processes: int = 2, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node PROCESSES`` on a free port, the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    return subprocess.run(
        [*launch, "--standalone", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# ------------------------------------------------------------------ the spec


def test_distributed_is_a_spec_field_with_its_values():
    rules = [{"match": "0", "transform": "factorize", "params": {"rank": 2}}]
    data = {"source": "random", "shape": [4]}
    spec = load_spec({"rules": rules, "training": {"data": data}})
    assert spec.training.distributed == "none"
    with pytest.raises(SpecError) as info:
        load_spec({"rules": rules, "training": {"data": data, "distributed": "ddp"}})
    assert "field 'training.distributed'" in str(info.value)
    assert "'none' or 'fsdp'" in str(info.value)
    for extra, message in [
        ({"progressive_rank": {"final": 0.5}}, "'progressive_rank' changes layer shapes"),
        ({"tt": {"normalize_cores": True}}, "'tt' tends whole TT cores"),
    ]:
        training = {"data": data, "distributed": "fsdp", **extra}
        with pytest.raises(SpecError, match=message):
            load_spec({"rules": rules, "training": training})


# ----------------------------------------------------------------- the pieces


def test_shard_units_are_the_blocks_else_the_children_not_tied_ones():
    model = Blocks()
    assert shard_units(model) == list(model.blocks)
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4))
    assert shard_units(seq) == [seq[0], seq[2], seq[3]]
    seq[3].weight = seq[0].weight  # tied: both stay in the root's group
    assert shard_units(seq) == [seq[2]]


def test_each_process_takes_a_slice_of_the_batch():
    batch = {"x": torch.arange(7.0), "mask": torch.ones(7), "name": "kept"}
    a, b = rank_share(batch, 0, 2), rank_share(batch, 1, 2)
    assert a["x"].tolist() == [0, 1, 2] and b["x"].tolist() == [3, 4, 5, 6]
    assert a["name"] == "kept" and len(b["mask"]) == 4
    with pytest.raises(UserInputError, match="cannot be shared by 3 processes"):
        rank_share(torch.zeros(2, 4), 0, 3)


@pytest.mark.parametrize(
    "options",
    [
        {"distill": {"output": "kl"}},
        {"distill": {"output": "mse", "features": "surgered"}},
        {"distill": {"output": "cosine"}},
        {"distill": {"output": "mse", "alpha": 0.3}, "labels": "labels"},
        {"mode": "finetune", "labels": "labels", "loss": "mse"},
    ],
    ids=["kl", "mse+features", "cosine", "mse+task", "finetune-mse"],
)
def test_the_shares_of_the_slices_add_up_to_the_loss_of_the_batch(options):
    # tokens, some padded: the shares of slices of 2 and 3 examples, their batch
    # statistics summed over both (as two processes would), give the batch's loss
    teacher = TokenMLP().eval()
    student = surgery.apply(
        teacher, {"rules": [{"match": "fc*", "transform": "factorize", "params": {"rank": 3}}]}
    )
    ids = torch.randint(1, 50, (5, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 2:] = mask[3, 4:] = 0
    labels = torch.randint(0, 8, (5, 6)) if options.get("loss") != "mse" else torch.randn(5, 6, 8)
    opts = Training(data={"source": "random", "shape": [6]}, **options)
    batch = {"input_ids": ids, "attention_mask": mask}
    if opts.labels:
        batch["labels"] = labels
    names = ["fc1", "fc2"] if opts.distill.features == "surgered" else []

    def loss_of(part, batch_sum):
        s_cap, t_cap = FeatureCapture(student, names, False), FeatureCapture(teacher, names, True)
        inputs, label = split_labels(part, opts.labels)
        loss, _ = training_loss(opts, student, teacher, inputs, label, s_cap, t_cap, batch_sum)
        s_cap.remove(), t_cap.remove()
        return float(loss.detach())

    slices = [rank_share(batch, r, 2) for r in (0, 1)]
    stats: list[list[torch.Tensor]] = [[], []]
    for part, seen in zip(slices, stats, strict=True):  # what each slice would sum
        loss_of(part, lambda v, seen=seen: seen.append(v.clone()) or v)
    sums = [a + b for a, b in zip(*stats, strict=True)]
    shares = [loss_of(part, lambda v, it=iter(sums): next(it)) for part in slices]
    assert sum(shares) == pytest.approx(loss_of(batch, None), rel=1e-5)


def test_optimizer_states_keyed_by_name_and_by_position_round_trip():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    indexed = opt.state_dict()
    named = named_optimizer_state(indexed, names)
    assert set(named["state"]) == set(names) and named["param_groups"][0]["params"] == names
    assert indexed_optimizer_state(named, names) == indexed


def test_fsdp_without_torchrun_trains_in_one_process_as_none_does():
    teacher, a = models()
    _, b = models()
    surgery.train(a, options(), teacher)
    surgery.train(b, options().model_copy(update={"distributed": "none"}), teacher)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ------------------------------------------------------- two processes on gloo


def test_two_fsdp_processes_compute_what_one_does_and_share_its_checkpoints(tmp_path):
    # one process: straight, and cut after the checkpoint of step 3
    teacher, student = models()
    straight = surgery.train(student, options(str(tmp_path / "single")), teacher)
    reference = student.state_dict()
    teacher, student = models()
    with stop_at(3), pytest.raises(Interrupt):
        surgery.train(student, options(str(tmp_path / "single3")), teacher)
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    run = torchrun([str(script), str(tmp_path)], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    full = [torch.load(tmp_path / f"full{r}.pt", weights_only=True) for r in (0, 1)]
    # both processes end with the same, whole model
    assert all(torch.equal(v, full[1]["state"][k]) for k, v in full[0]["state"].items())
    # ... that one process computes: the same global batches, losses and evaluations
    assert close(full[0]["state"], reference)
    assert full[0]["losses"] == pytest.approx(straight.losses, rel=1e-3, abs=1e-6)
    assert [e["step"] for e in full[0]["evals"]] == [3, 6]
    assert [e["cosine"] for e in full[0]["evals"]] == pytest.approx(
        [e["cosine"] for e in straight.evals], rel=1e-5
    )
    # interrupted at step 3 and resumed: the run that was not interrupted, exactly
    resumed = torch.load(tmp_path / "resumed0.pt", weights_only=True)
    assert all(torch.equal(v, full[0]["state"][k]) for k, v in resumed["state"].items())
    assert resumed["losses"] == full[0]["losses"]
    # a single-process checkpoint resumes under FSDP ...
    from_single = torch.load(tmp_path / "from_single0.pt", weights_only=True)
    assert close(from_single["state"], reference)
    # ... and an FSDP checkpoint in one process
    teacher, student = models()
    result = surgery.train(student, options(str(tmp_path / "cut3")), teacher)
    assert result.resumed_from == 3 and close(student.state_dict(), reference)
    # the same checkpoint files: the same entries, tensors, optimizer indices
    a = torch.load(tmp_path / "fsdp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    assert a.keys() == b.keys() and a["state"].keys() == b["state"].keys()
    assert close(a["model"], b["model"]) and close(a["best_state"], b["best_state"])
    (ga, sa), (gb, sb) = [(c["optimizer"]["param_groups"], c["optimizer"]["state"]) for c in (a, b)]
    assert [g["params"] for g in ga] == [g["params"] for g in gb] and sa.keys() == sb.keys()
    for i, state in sa.items():
        assert state.keys() == sb[i].keys()
        assert all(torch.allclose(v, sb[i][k], atol=1e-6) for k, v in state.items())


def test_cli_under_torchrun_prints_and_writes_once_what_one_process_writes(tmp_path):
    torch.manual_seed(0)
    torch.save(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval(),
        tmp_path / "model.pt",
    )
    spec = {
        "rules": [{"match": "0", "transform": "factorize", "params": {"rank": 4}}],
        "training": {
            "data": {"source": "random", "shape": [16], "samples": 32},
            "steps": 4,
            "batch_size": 8,
            "lr": 1e-2,
            "distributed": "fsdp",
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    runner = CliRunner()
    r = runner.invoke(cli, ["apply", str(tmp_path / "spec.json"), str(tmp_path / "model.pt")])
    assert r.exit_code == 0, r.output
    args = ["train", "spec.json", "model.surgered.pt", "--teacher", "model.pt"]
    os.chdir(tmp_path)  # restored by the fixture below
    r = runner.invoke(cli, [*args, "-o", "one.pt"])
    assert r.exit_code == 0, r.output
    assert "without torchrun: training in this one process" in r.output
    assert "torchrun --nproc_per_node N -m tnsurgery train" in r.output
    run = torchrun(["-m", "tnsurgery", *args, "-o", "two.pt"], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("trained 4 steps") == 1  # rank 0's lines, once
    assert run.stdout.count("wrote ") == r.output.count("wrote ") == 3
    assert "without torchrun" not in run.stderr
    one = torch.load(tmp_path / "one.pt", weights_only=False).state_dict()
    two = torch.load(tmp_path / "two.pt", weights_only=False).state_dict()
    assert close(one, two)


def tiny_llama() -> tuple[nn.Module, nn.Module]:
    """A tiny Llama (tied embeddings; its blocks in ``model.layers``, a ModuleList)
    and its MLPs factorized."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    teacher = transformers.LlamaForCausalLM(config).eval()
    rule = {"match": "model.layers.*.mlp.*_proj", "transform": "factorize", "params": {"rank": 8}}
    return teacher, surgery.apply(teacher, {"rules": [rule]})


LLAMA_OPTIONS = {
    "data": {"source": "random", "shape": [12], "samples": 24, "dtype": "int64", "vocab_size": 64},
    "steps": 3,
    "batch_size": 8,
    "lr": 1e-3,
    "distributed": "fsdp",
}

LLAMA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    from tnsurgery import surgery
    from tests.test_distributed import LLAMA_OPTIONS, tiny_llama

    teacher, student = tiny_llama()
    result = surgery.train(student, LLAMA_OPTIONS, teacher)
    if dist.get_rank() == 0:
        torch.save({"state": student.state_dict(), "losses": result.losses}, sys.argv[1])
    dist.destroy_process_group()
    """
)


def test_a_tiny_llama_sharded_by_its_blocks_trains_as_in_one_process(tmp_path):
    # the logits' normalized MSE (a ratio over the batch), tied embeddings in the
    # root's group, the rotary buffers (not in the state dict) copied to the shards
    teacher, student = tiny_llama()
    assert shard_units(student) == list(student.model.layers)
    straight = surgery.train(student, LLAMA_OPTIONS, teacher)
    (tmp_path / "llama.py").write_text(LLAMA_SCRIPT)
    run = torchrun([str(tmp_path / "llama.py"), str(tmp_path / "llama.pt")], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = torch.load(tmp_path / "llama.pt", weights_only=True)
    assert got["losses"] == pytest.approx(straight.losses, rel=1e-4)
    assert close(got["state"], student.state_dict())


FAILING_SCRIPT = textwrap.dedent(
    """
    import os
    import tnsurgery.builtins.trainer as loop
    from tnsurgery import surgery
    from tnsurgery.errors import UserInputError
    from tests.test_distributed import models, options

    real, calls = loop.training_loss, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3 and os.environ["RANK"] == "1":
            raise UserInputError("the data of rank 1 went bad")
        return real(*args, **kw)

    loop.training_loss = failing
    teacher, student = models()
    surgery.train(student, options(), teacher)
    """
)


def test_a_failure_on_one_process_ends_every_process_with_its_message(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)
    start = time.monotonic()
    run = torchrun([str(script)], tmp_path)
    assert run.returncode != 0
    assert "the data of rank 1 went bad" in run.stdout + run.stderr
    assert time.monotonic() - start < 60  # rank 0, waiting in a collective, was ended


@pytest.fixture(autouse=True)
def _keep_cwd():
    where = Path.cwd()
    yield
    os.chdir(where)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (FSDP on nccl, one process per GPU)"
)
def test_fsdp_on_the_gpus_computes_what_one_process_does(tmp_path):
    # every GPU there is (a world of 1 on one GPU): the models sharded on cuda, nccl
    teacher, student = models()
    straight = surgery.train(student, options(), teacher)
    (tmp_path / "gpu.py").write_text(
        textwrap.dedent(
            """
            import sys, torch
            import torch.distributed as dist
            from tnsurgery import surgery
            from tests.test_distributed import models, options
            teacher, student = models()
            result = surgery.train(student, options(), teacher)
            assert dist.get_backend() == "nccl"
            if dist.get_rank() == 0:
                torch.save({"state": student.state_dict(), "losses": result.losses}, sys.argv[1])
            dist.destroy_process_group()
            """
        )
    )
    gpus = torch.cuda.device_count()
    run = torchrun([str(tmp_path / "gpu.py"), str(tmp_path / "gpu.pt")], tmp_path, gpus, 300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = torch.load(tmp_path / "gpu.pt", weights_only=True)
    assert got["losses"] == pytest.approx(straight.losses, rel=1e-3)
    assert all(
        torch.allclose(v, student.state_dict()[k], rtol=1e-3, atol=1e-4)
        for k, v in got["state"].items()
    )
