"""Serving settings: the CLI config, Serve deployment options, serve.yaml and the RayService.

`pipelines/configs/serve.yaml` is validated with Ray Serve's own `ServeDeploySchema` (what
`serve deploy` checks) and its application args with `ServeConfig`; the RayService in
`cluster/kuberay/rayservice.yaml` must carry the same applications (the generic KubeRay
checks are in test_cluster_configs.py). No Ray cluster is started here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from bge_core.errors import InputError
from pipelines.common.cli import ConfigError, config_from_dict, make_config, parse_config
from pipelines.serve.api import API_KEY_ENV
from pipelines.serve.main import (
    Embedder,
    ServeConfig,
    app_builder,
    deployment_options,
    targets_to_urls,
)

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "pipelines" / "configs" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
AWS_YAML = ROOT / "cluster" / "aws.yaml"


def _rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE_YAML.read_text())


def test_cli_flags_parse_into_the_config():
    cfg = parse_config(ServeConfig, [
        "--model", "/ckpt/finetuned", "--host", "0.0.0.0", "--port", "9000",
        "--replicas", "2,6", "--gpus-per-replica", "1", "--dtype", "fp16",
        "--max_inputs_per_request", "64", "--query-instruction-for-retrieval", ""])
    assert (cfg.encoder.model, cfg.host, cfg.port, cfg.encoder.dtype) == (
        "/ckpt/finetuned", "0.0.0.0", 9000, "fp16")
    assert cfg.replica_range() == (2, 6) and cfg.gpus_per_replica == 1.0
    assert cfg.max_inputs_per_request == 64
    # "" means no instruction (not the model's): it must reach the encoder
    assert cfg.encoder_overrides() == {"dtype": "fp16", "query_instruction": ""}
    assert ServeConfig().encoder_overrides() == {"dtype": "fp32"}  # the model's own settings


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "0"], "replicas"),
    (["--replicas", "4,2"], "replicas"),
    (["--replicas", "two"], "replicas"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens"),
    (["--max-inputs-per-request", "0"], "--max-inputs-per-request"),
    (["--accelerator-type", "L4"], "--accelerator-type needs --gpus-per-replica"),
    (["--max_queued_requests", "-1"], "--max-queued-requests"),
    (["--dtype", "int8"], "--dtype int8 needs --calibration"),
    (["--dtype", "int8", "--calibration", "c.txt", "--gpus-per-replica", "1"],
     "int8 runs on CPU replicas only"),
    (["--dtype", "fp16"], "fp16 needs --gpus-per-replica > 0"),
    (["--calibration", "texts.txt"], "is for --dtype int8 only"),
    (["--max-length", "0"], "--max-length must be >= 1"),
])
def test_bad_settings_are_errors_naming_the_flag(flags: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        parse_config(ServeConfig, flags)


def test_the_model_settings_are_declared_once_with_the_bulk_jobs():
    """ServeConfig takes --model, --dtype, ... from the bulk jobs' `ModelOptions` group: the
    same flags, types and defaults, and none re-declared beside the group."""
    from dataclasses import fields

    from pipelines.common.cli import flat_fields
    from pipelines.common.encode_options import EncodeOptions, ModelOptions
    from pipelines.embed.config import EmbedConfig

    shared = {f.name for f in fields(ModelOptions)}
    own = {f.name for f in fields(ServeConfig)} - {"encoder"}
    assert not own & {f.name for f in fields(EncodeOptions)}
    serve_flags, embed_flags = flat_fields(ServeConfig), flat_fields(EmbedConfig)
    assert {k: serve_flags[k] for k in shared} == {k: embed_flags[k] for k in shared}
    cfg = parse_config(ServeConfig, ["--model_name_or_path", "m", "--max-tokens-per-batch", "9"])
    assert cfg.encoder == ModelOptions(model="m", max_tokens_per_batch=9)


def test_fixed_replicas_and_autoscaling_bounds():
    fixed = deployment_options(ServeConfig(replicas="3"))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    scaled = deployment_options(ServeConfig(replicas="1,8", max_ongoing_requests=32))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8,
                                            "target_ongoing_requests": 16}


def test_deployment_takes_gpus_limits_and_answers_429_when_the_queue_is_full():
    cfg = make_config(ServeConfig, gpus_per_replica=1, cpus_per_replica=2,
                      accelerator_type="L4", max_ongoing_requests=40, max_queued_requests=7)
    deployment = Embedder.options(**deployment_options(cfg))  # Serve validates the options
    assert deployment.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0,
                                            "accelerator_type": "L4"}
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (40, 7)
    assert deployment.backpressure_config.status_code == 429
    cpu_only = Embedder.options(**deployment_options(ServeConfig()))
    assert cpu_only.ray_actor_options["num_gpus"] == 0


# ----------------------------------------------------------------------------- serve.yaml


def test_serve_yaml_passes_serves_own_schema_and_builds_the_app(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(API_KEY_ENV, "k3y")
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = config.applications
    assert app.import_path == "pipelines.serve_embeddings:app_builder"
    settings = config_from_dict(ServeConfig, app.args, source=SERVE_YAML.name)
    assert settings.gpus_per_replica >= 1 and settings.encoder.accelerator_type
    assert settings.encoder.model == "BAAI/bge-base-en-v1.5" and settings.encoder.dtype == "fp16"
    assert app_builder(app.args) is not None  # builds without loading the model
    with pytest.raises(ConfigError, match="max_batch_tokes"):
        app_builder({**app.args, "max_batch_tokes": 8})


def test_serve_yaml_binds_every_interface_only_behind_the_key(monkeypatch: pytest.MonkeyPatch):
    """serve.yaml's proxies listen on 0.0.0.0: without BGE_SERVE_API_KEY its application
    refuses to build, unless its args open it on purpose (they do not)."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = yaml.safe_load(SERVE_YAML.read_text())
    (app,) = config["applications"]
    assert config["http_options"]["host"] == "0.0.0.0"
    assert not app["args"].get("allow_unauthenticated", False)
    with pytest.raises(InputError, match=f"{API_KEY_ENV}.*--allow-unauthenticated"):
        app_builder(app["args"])
    assert app_builder({**app["args"], "allow_unauthenticated": True}) is not None


def test_rayservice_serves_the_same_applications_as_serve_yaml():
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["applications"] == yaml.safe_load(SERVE_YAML.read_text())["applications"]


def test_rayservice_pods_take_the_api_key_from_a_secret_and_expose_port_8000():
    spec = _rayservice()["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        secret = env["BGE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "bge-serve-api-key", "key": "api_key"}
        assert {"name": "serve", "containerPort": 8000} in container["ports"]


def test_serving_replicas_fit_the_pools_that_offer_their_gpu():
    """The accelerator type serve.yaml asks for exists on the RayService's pool (and in
    aws.yaml only on the inference pool), with room for the autoscaling maximum."""
    (app,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    cfg = config_from_dict(ServeConfig, app["args"])
    wanted = f"accelerator_type:{cfg.encoder.accelerator_type}"
    (group,) = _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert wanted in group["rayStartParams"]["resources"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * gpus >= cfg.replica_range()[1] * cfg.gpus_per_replica
    aws = yaml.safe_load(AWS_YAML.read_text())["available_node_types"]
    assert {name for name, t in aws.items() if wanted in t["resources"]} == {"gpu-inference"}


def test_cli_bad_flag_exits_2_with_one_line_before_starting_ray(capsys: pytest.CaptureFixture):
    from pipelines.serve.main import main

    assert main(["--replicas", "3,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("serve_embeddings: error:") and "replicas" in err[0]


def test_cli_open_host_without_a_key_exits_2_with_one_line_before_starting_ray(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from pipelines.common import cli
    from pipelines.serve.main import main

    started: list[bool] = []  # the suite's Ray may be up already: watch the one start call
    monkeypatch.setattr(cli, "start_ray", lambda: started.append(True))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["--host", "0.0.0.0"]) == 2
    assert not started
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("serve_embeddings: error: refusing to serve on 0.0.0.0")
    assert API_KEY_ENV in line and "--allow-unauthenticated" in line


def test_the_script_refuses_an_open_host_without_a_key_as_a_user_runs_it():
    """`python pipelines/serve_embeddings.py --host 0.0.0.0`: non-zero, one line, no Ray."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    done = subprocess.run([sys.executable, "pipelines/serve_embeddings.py", "--host", "0.0.0.0"],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert API_KEY_ENV in line and "--allow-unauthenticated" in line
    assert "Started a local Ray" not in done.stdout + done.stderr


def test_direct_urls_are_the_apps_http_replicas_not_the_proxy():
    """`direct_urls` reads Serve's own target groups (the schema load balancers get)."""
    from ray.serve.schema import RequestProtocol, Target, TargetGroup

    def group(app: str, protocol: RequestProtocol, ports: list[int], prefix: str = "/"):
        targets = [Target(ip="10.0.0.5", port=p, instance_id=f"i{p}", name=f"r{p}")
                   for p in ports]
        return TargetGroup(targets=targets, route_prefix=prefix, protocol=protocol,
                           app_name=app)

    groups = [group("bge-embeddings", RequestProtocol.HTTP, [30000, 8000, 30001]),
              group("bge-embeddings", RequestProtocol.GRPC, [40000]),
              group("other", RequestProtocol.HTTP, [30002])]
    assert targets_to_urls(groups, "bge-embeddings", 8000) == [
        "http://10.0.0.5:30000", "http://10.0.0.5:30001"]  # the proxy's port left out
    # replicas bound to loopback are reached there, not at the node's address
    assert targets_to_urls(groups, "bge-embeddings", 8000, "127.0.0.1") == [
        "http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    assert targets_to_urls(groups, "bge-embeddings", 8000, "::1") == [
        "http://[::1]:30000", "http://[::1]:30001"]
    assert targets_to_urls(groups, "bge-embeddings", 8000, "0.0.0.0")[0] == \
        "http://10.0.0.5:30000"
    routed = [group("bge-embeddings", RequestProtocol.HTTP, [30000], "/embed/")]
    assert targets_to_urls(routed, "bge-embeddings", None) == ["http://10.0.0.5:30000/embed"]
    assert targets_to_urls([], "bge-embeddings", 8000) == []
