"""Pure pieces of the training machinery: optimizer groups, schedule, precision, progress,
the per-step hook and the fault drill passed through it, Ray Train settings (no cluster
needed)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from bge_core import precision
from bge_core.optim import SCHEDULES, build_adamw, build_scheduler, warmup_steps
from bge_core.precision import Precision, resolve_precision
from bge_core.progress import Progress, ProgressMeter, eta_s, progress_line
from bge_core.train_state import TrainState
from bge_core.trainable import enable_gradient_checkpointing
from pipelines.train.cpu_share import even_cpu_share, torch_threads
from pipelines.train.driver import (
    RunSettings,
    export_model,
    scaling_config,
    storage_path,
)
from pipelines.train.session import StepInfo
from tests.fault_hooks import ExitAfterStep


def test_adamw_excludes_bias_and_norm_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 1  # Linear.weight
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def _lrs(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("total, ratio", [(1, 0.0), (10, 0.2), (7, 0.1), (20, 0.33), (5, 1.0)])
def test_schedules_follow_transformers_get_scheduler_step_by_step(kind, total, ratio):
    warmup = warmup_steps(total, ratio)
    assert warmup == math.ceil(total * ratio)  # Hugging Face's rounding of warmup_ratio
    ours_opt, theirs_opt = _sgd(), _sgd()
    ours = build_scheduler(ours_opt, kind, warmup, total)
    theirs = get_scheduler(kind, theirs_opt, num_warmup_steps=warmup, num_training_steps=total)
    assert _lrs(ours, ours_opt, total + 2) == _lrs(theirs, theirs_opt, total + 2)


def test_linear_warmup_is_step_over_warmup_then_decay():
    opt = _sgd()
    lrs = [lr / 0.5 for lr in _lrs(build_scheduler(opt, "linear", 4, 10), opt, 11)]
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # step / warmup
    assert lrs[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_steps(10, 1.5)
    with pytest.raises(ValueError, match="'polynomial' is not one of linear"):
        build_scheduler(opt, "polynomial", 1, 10)


def test_precision_flags():
    assert resolve_precision(False, False) == "fp32"
    assert resolve_precision(True, False) == "fp16"
    assert resolve_precision(False, True) == "bf16"
    assert resolve_precision(True, False, "cuda") == "fp16"
    assert resolve_precision(True, False, "cpu") == "fp32"  # a GPU command runs on CPU
    assert resolve_precision(False, True, "cpu") == "bf16"
    with pytest.raises(ValueError, match="exclusive"):
        resolve_precision(True, True)


def test_bf16_training_on_a_cpu_without_native_bf16_runs_fp32(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert Precision.create("bf16", cpu).dtype == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="bge_core.precision"):
        amp = Precision.create("bf16", cpu)
    assert amp.dtype == "fp32" and amp.scaler is None
    assert any("fp32 instead" in r.getMessage() for r in caplog.records)
    with amp.autocast():  # no autocast: the matmul stays float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_progress_meter_reports_rate_and_eta():
    meter = ProgressMeter(total_steps=10, start_step=2, started=0.0)
    state = TrainState(step=2)
    state.advance(8)
    meter.count(8)
    metrics = meter.metrics(state.step, loss=1.5)
    assert (metrics["step"], metrics["total_steps"], metrics["loss"]) == (3, 10, 1.5)
    seconds_per_step = 8 / metrics["examples_per_s"]  # one step of 8 examples so far
    assert metrics["eta_s"] == pytest.approx(7 * seconds_per_step, rel=1e-3)  # 7 steps left
    assert state.examples == 8 and state.step_in_epoch == 1


def test_one_progress_line_for_rows_and_training_steps():
    import logging

    assert progress_line(1234, 10000, "rows", 45.61, "rows", 193.4) == \
        "1,234/10,000 rows (12.3%), 45.6 rows/s, ETA 193s"
    assert eta_s(done=2, left=6, elapsed=10.0) == 30.0  # 5 s a unit, 6 units left
    assert eta_s(0, 5, 1.0) == math.inf and eta_s(4, 0, 1.0) == 0.0
    rows = Progress(total=10, unit="rows", every_s=3600, logger=logging.getLogger("t"))
    rows.start -= 2.0  # 4 rows in 2 s: 2 rows/s, 6 left in 3 s
    rows.advance(4)
    assert rows.line() == "4/10 rows (40.0%), 2.0 rows/s, ETA 3s"
    steps = {"step": 3, "total_steps": 10, "examples_per_s": 12.34, "eta_s": 45.2, "loss": 1.5}
    assert ProgressMeter.line(steps) == "3/10 steps (30.0%), 12.3 examples/s, ETA 45s, loss 1.5000"


def test_storage_path_keeps_uris_and_resolves_local(tmp_path):
    assert storage_path("s3://bucket/run/") == "s3://bucket/run"
    assert storage_path(str(tmp_path / "x")) == str((tmp_path / "x").resolve())


def test_fault_drill_kills_the_chosen_rank_once(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr("tests.fault_hooks.time.sleep", lambda s: None)
    monkeypatch.setattr("tests.fault_hooks.os._exit", exits.append)
    marker = tmp_path / "killed"
    fault = ExitAfterStep(step=3, marker=str(marker))  # alone: rank 0 is the victim
    fault(StepInfo(rank=0, world_size=1, step=2, epoch=0))
    assert exits == [] and not marker.exists()
    fault(StepInfo(rank=0, world_size=1, step=3, epoch=0))
    assert exits == [1] and marker.read_text().startswith("rank 0 killed after step 3")
    fault(StepInfo(rank=0, world_size=1, step=3, epoch=0))  # the restarted run goes on
    assert exits == [1]
    other = ExitAfterStep(step=3, marker=str(tmp_path / "other"), rank=1)
    other(StepInfo(rank=0, world_size=2, step=3, epoch=0))  # not this rank
    assert exits == [1] and not (tmp_path / "other").exists()
    two = ExitAfterStep(step=3, marker=str(tmp_path / "two"))  # default victim of 2: rank 1
    two(StepInfo(rank=0, world_size=2, step=3, epoch=0))
    assert exits == [1]
    two(StepInfo(rank=1, world_size=2, step=3, epoch=0))
    assert exits == [1, 1] and (tmp_path / "two").read_text().startswith("rank 1 killed")


def test_fault_drill_travels_to_ray_workers_by_reference(tmp_path):
    import pickle

    import cloudpickle

    drill = ExitAfterStep(step=3, marker=str(tmp_path / "killed"))
    payload = cloudpickle.dumps({"on_step": drill})  # how Ray ships train_loop_config
    # by reference: the module and class names, not the code (workers import tests/)
    assert b"tests.fault_hooks" in payload and b"ExitAfterStep" in payload
    assert b"os._exit" not in payload and b"REGISTER_S" not in payload
    assert pickle.loads(payload)["on_step"] == drill


def test_session_calls_the_step_hook_after_every_step(tmp_path):
    """`Session.finish_step` gives the hook rank, world size, step and epoch (steps that
    neither log nor save, so no Ray is needed)."""
    from pipelines.train.args import TrainArgs
    from pipelines.train.session import Session

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainArgs(model_name_or_path="m", train_data="d", output_dir=str(tmp_path),
                     save_steps=100, logging_steps=100)
    seen: list[StepInfo] = []
    session = Session(model, optimizer, build_scheduler(optimizer, "constant", 0, 100),
                      amp=None, io=None, state=TrainState(epoch=2), meter=ProgressMeter(100),
                      args=args, on_step=seen.append)
    session.finish_step(8, losses=lambda: pytest.fail("no report is due"))
    session.finish_step(8, losses=lambda: pytest.fail("no report is due"))
    assert seen == [StepInfo(rank=0, world_size=1, step=1, epoch=2),
                    StepInfo(rank=0, world_size=1, step=2, epoch=2)]
    assert session.state.examples == 16


def test_export_model_skips_resume_only_files(tmp_path):
    import fsspec

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for name in ("config.json", "heads.pt", "sub/tok.json"):
        (model / name).write_text(name)
    assert export_model(model, "memory://exported/run", skip=("heads.pt",)) == \
        "memory://exported/run"
    fs = fsspec.filesystem("memory")
    assert sorted(p.split("/run/")[1] for p in fs.find("/exported/run")) == [
        "config.json", "sub/tok.json"]
    assert export_model(model, str(tmp_path / "local")) == str(tmp_path / "local")
    assert (tmp_path / "local" / "heads.pt").read_text() == "heads.pt"


def test_gradient_checkpointing_keeps_gradients(tiny_bert_dir):
    from bge_core.model import Encoder

    def grads(checkpointing):
        encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")
        enable_gradient_checkpointing(encoder, checkpointing)
        encoder.train()
        torch.manual_seed(0)  # same dropout masks in both runs
        ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]])
        encoder(ids, (ids > 0).long()).pow(2).sum().backward()
        return encoder, {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}

    plain_model, plain = grads(False)
    ckpt_model, ckpt = grads(True)
    assert ckpt_model.backbone.is_gradient_checkpointing
    assert not plain_model.backbone.is_gradient_checkpointing
    for name, grad in plain.items():
        assert torch.allclose(ckpt[name], grad, rtol=1e-4, atol=1e-7), name
    with pytest.raises(ValueError, match="no Hugging Face backbone"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), True)


def test_scaling_config_asks_for_one_gpu_of_the_given_type():
    gpu = scaling_config(RunSettings(name="r", output_dir="o", num_workers=48, use_gpu=True,
                                     accelerator_type="A100", cpus_per_worker=8))
    assert gpu.resources_per_worker == {"CPU": 8, "GPU": 1}
    assert gpu.accelerator_type == "A100" and gpu.num_workers == 48 and gpu.use_gpu
    cpu = scaling_config(RunSettings(name="r", output_dir="o", cpus_per_worker=0.5))
    assert cpu.resources_per_worker == {"CPU": 0.5} and not cpu.use_gpu
    with pytest.raises(ValueError, match="accelerator_type needs --use_gpu"):
        scaling_config(RunSettings(name="r", output_dir="o", accelerator_type="A100"))


def test_training_configs_refuse_a_gpu_type_without_gpus(tmp_path):
    from pipelines.train.finetune import FinetuneConfig
    from pipelines.train.retromae import RetroMAEConfig

    for cls in (FinetuneConfig, RetroMAEConfig):
        base = {"model_name_or_path": "m", "train_data": "d", "output_dir": str(tmp_path)}
        with pytest.raises(ValueError, match="accelerator_type needs --use_gpu"):
            cls(**base, accelerator_type="A100")
        assert cls(**base, accelerator_type="A100", use_gpu=True).accelerator_type == "A100"


@pytest.mark.parametrize("nodes, workers, share", [
    ([2.0], 1, 1.5),  # one worker on a 2-core box: half a CPU stays for the read tasks
    ([2.0], 2, 0.75),
    ([2.0, 2.0], 2, 1.5),  # one per node (two would not fit one node with room left)
    ([1.0, 1.0], 2, 0.25),  # 0.5 each could be packed onto one node, leaving it nothing
    ([4.0, 1.0], 2, 1.75),  # both on the 4-CPU node
    ([16.0, 16.0], 2, 15.5),
    ([16.0, 16.0], 4, 7.75),
    ([0.0, 16.0], 1, 15.5),  # a head node without CPUs is left out
])
def test_default_cpu_share_keeps_room_for_read_tasks_on_every_node(nodes, workers, share):
    got = even_cpu_share(nodes, workers, reserve=0.5)
    assert got == pytest.approx(share)
    assert sum(math.floor(c / got + 1e-9) for c in nodes) >= workers  # all placed
    for cpus in nodes:  # however many of them Ray packs on a node, half a CPU stays free
        packed = min(workers, math.floor(cpus / got + 1e-9))
        assert packed == 0 or cpus - packed * got >= 0.5 - 1e-9
    assert even_cpu_share(nodes, workers, reserve=0.5) == got  # computed, not sampled


def test_no_room_asks_for_the_flag():
    with pytest.raises(ValueError, match="--cpus_per_worker"):
        even_cpu_share([0.5, 0.0], 1, reserve=0.5)


@pytest.mark.parametrize("cpus, threads", [(0.25, 1), (0.75, 1), (1.0, 1), (1.5, 2),
                                           (1.9375, 2), (5.17, 5), (15.5, 16)])
def test_torch_threads_follow_from_the_cpu_share(cpus, threads):
    assert torch_threads(cpus) == threads
