"""Pure pieces of the training machinery: optimizer groups, schedule, precision, progress."""

from __future__ import annotations

import pytest
import torch

from bge_core.optim import build_adamw, linear_warmup_decay, warmup_steps
from pipelines.train_common import (
    ProgressMeter,
    RunSettings,
    TrainState,
    maybe_inject_failure,
    resolve_precision,
    scaling_config,
    storage_path,
)


def test_adamw_excludes_bias_and_norm_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 1  # Linear.weight
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def test_linear_warmup_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, warmup=warmup_steps(10, 0.2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == 1.0  # two warm-up steps, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # decays every step
    assert opt.param_groups[0]["lr"] == 0.0  # reaches 0 at the end
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_steps(10, 1.5)


def test_precision_flags():
    assert resolve_precision(False, False) == "fp32"
    assert resolve_precision(True, False) == "fp16"
    assert resolve_precision(False, True) == "bf16"
    with pytest.raises(ValueError, match="exclusive"):
        resolve_precision(True, True)


def test_progress_meter_reports_rate_and_eta():
    meter = ProgressMeter(total_steps=10, start_step=2, started=0.0)
    state = TrainState(step=2)
    state.advance(8)
    metrics = meter.update(state.step, 1.5, 8)
    assert metrics["step"] == 3 and metrics["loss"] == 1.5
    assert metrics["examples_per_s"] > 0 and metrics["eta_s"] >= 0
    assert state.examples == 8 and state.step_in_epoch == 1


def test_storage_path_keeps_uris_and_resolves_local(tmp_path):
    assert storage_path("s3://bucket/run/") == "s3://bucket/run"
    assert storage_path(str(tmp_path / "x")) == str((tmp_path / "x").resolve())


def test_fault_injection_is_off_without_the_variable(monkeypatch):
    monkeypatch.delenv("BGE_FAULT_INJECT", raising=False)
    maybe_inject_failure(1)  # returns: nothing to inject


def test_gradient_checkpointing_keeps_gradients(tiny_bert_dir):
    from bge_core.model import Encoder
    from pipelines.train_common import enable_gradient_checkpointing

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
    resources = gpu._resources_per_worker_not_none  # what each worker's actor requests
    assert resources["CPU"] == 8 and resources["GPU"] == 1
    assert resources["accelerator_type:A100"] > 0 and gpu.num_workers == 48
    cpu = scaling_config(RunSettings(name="r", output_dir="o", cpus_per_worker=0.5))
    assert cpu._resources_per_worker_not_none == {"CPU": 0.5}
    with pytest.raises(ValueError, match="accelerator_type needs --use_gpu"):
        scaling_config(RunSettings(name="r", output_dir="o", accelerator_type="A100"))


def test_training_configs_refuse_a_gpu_type_without_gpus(tmp_path):
    from pipelines.finetune import FinetuneConfig
    from pipelines.pretrain_retromae import RetroMAEConfig

    for cls in (FinetuneConfig, RetroMAEConfig):
        base = {"model_name_or_path": "m", "train_data": "d", "output_dir": str(tmp_path)}
        with pytest.raises(ValueError, match="accelerator_type needs --use_gpu"):
            cls(**base, accelerator_type="A100")
        assert cls(**base, accelerator_type="A100", use_gpu=True).accelerator_type == "A100"
