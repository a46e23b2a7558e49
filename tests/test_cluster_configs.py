"""Cluster YAMLs: Ray's own schema and validation, KubeRay CRD fields, GPU shapes, security.

The Ray cluster-launcher config is checked with the JSON schema shipped inside the installed
`ray` package and with Ray's `prepare_config` + `validate_config` (what `ray up` runs before
touching the cloud). The KubeRay manifests are checked for the fields their CRDs require.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from pipelines.common.cli import parse_config
from pipelines.embed.main import EmbedConfig

ROOT = Path(__file__).resolve().parents[1]
AWS_YAML = ROOT / "cluster" / "aws.yaml"
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
CONFIG_DIR = ROOT / "pipelines" / "configs"
TRAIN_GPUS = 48
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard/job server, Ray client


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _kuberay_docs() if doc["kind"] == kind]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# ----------------------------------------------------------------------------- aws.yaml


def test_aws_yaml_matches_rays_json_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_load(AWS_YAML), schema)


def test_aws_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(AWS_YAML))  # fills defaults as `ray up` does, offline
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_training_pool_holds_48_gpus_and_inference_pool_has_gpus():
    types = _load(AWS_YAML)["available_node_types"]
    train, infer = types["gpu-train"], types["gpu-inference"]
    assert train["resources"]["GPU"] == 8 and train["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert train["max_workers"] * train["resources"]["GPU"] == TRAIN_GPUS
    assert infer["resources"]["GPU"] >= 1 and infer["max_workers"] >= 1
    assert types["head-cpu"]["resources"].get("GPU", 0) == 0


def test_aws_yaml_keeps_token_auth_on_and_ray_ports_closed():
    config = _load(AWS_YAML)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [cmd for cmd in starts if "ray start" in cmd]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in cmd for cmd in ray_starts)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    opened = set()
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        opened |= set(range(rule["FromPort"], rule["ToPort"] + 1))
    assert opened == {22}, f"only SSH may be reachable from outside, got ports {opened}"
    assert not opened & RAY_PORTS


def _pins(text: str) -> dict[str, str]:
    """Package name -> pinned version of every quoted requirement in `text`."""
    from packaging.requirements import Requirement

    pins = {}
    for spec in re.findall(r'"([A-Za-z0-9_.\[\],-]+(?:[=<>!~]=?[^"]*)?)"', text):
        requirement = Requirement(spec)
        (specifier,) = requirement.specifier  # exactly one clause: `==version`
        assert specifier.operator == "==", f"{spec!r} is not pinned"
        pins[requirement.name.lower()] = specifier.version
    return pins


def test_aws_yaml_pins_versions_the_project_accepts():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pins = _pins(" ".join(_load(AWS_YAML)["setup_commands"]))
    assert pins["ray"] == ray.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = dependency.name.lower()
        assert name in pins, f"{name} (a dependency in pyproject.toml) is not installed"
        assert dependency.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {dependency}"


def test_kubernetes_image_recipe_pins_the_same_versions():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    dockerfile = docs.split("```dockerfile", 1)[1].split("```", 1)[0]
    image_pins = _pins(dockerfile)
    aws_pins = _pins(" ".join(_load(AWS_YAML)["setup_commands"]))
    assert f"rayproject/ray:{aws_pins['ray']}-py311" in dockerfile
    assert image_pins and all(aws_pins[name] == v for name, v in image_pins.items())
    assert set(aws_pins) - set(image_pins) == {"ray", "boto3"}  # in the base image / head only


def test_aws_yaml_has_one_comment_per_key():
    """Every mapping key is documented by a comment on the line above (Ray's example style)."""
    lines = AWS_YAML.read_text().splitlines()
    key_line = re.compile(r"^(\s*)([A-Za-z_~][\w./~-]*):(\s|$)")
    undocumented = []
    for number, line in enumerate(lines):
        match = key_line.match(line)
        if not match or line.lstrip().startswith("- "):
            continue
        previous = lines[number - 1].strip() if number else ""
        if not previous.startswith("#"):
            undocumented.append(f"line {number + 1}: {line.strip()}")
    # keys inside list items (block devices, security-group rules) are described by the
    # comment on the list's own key
    nested = [u for u in undocumented if not re.search(r"(Ebs|DeviceName|Volume|Port|Ip|Cidr)", u)]
    assert nested == [], "keys without a comment:\n" + "\n".join(nested)


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_parse_with_known_kinds():
    kinds = sorted(doc["kind"] for _, doc in _kuberay_docs())
    assert kinds == ["CronJob", "RayCluster", "RayJob", "RayJob", "RayService", "ServiceAccount"]
    for name, doc in _kuberay_docs():
        assert doc["metadata"]["name"], name
        expected = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1",
                    "CronJob": "batch/v1"}
        assert doc["apiVersion"] == expected.get(doc["kind"], "v1"), name


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_cluster_specs_carry_the_crd_fields(kind: str):
    for name, doc in _by_kind(kind):
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", f"{name}: token auth must stay on"
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), name
        groups = spec["workerGroupSpecs"]
        assert groups, name
        for group in groups:
            assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(
                group
            ), name
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        for pod in [head] + groups:
            containers = pod["template"]["spec"]["containers"]
            assert containers and all(c["name"] and c["image"] for c in containers), name
            for container in containers:
                for side in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][side]), name
        for group in groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, name
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert (
            "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        ), f"{name}: the head is CPU-only"


def _gpus(group: dict[str, Any], count_key: str) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return group[count_key] * int(limits["nvidia.com/gpu"])


def test_kuberay_training_shapes_add_up_to_48_gpus():
    ((_, cluster),) = _by_kind("RayCluster")
    train = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-train"]
    assert _gpus(train[0], "maxReplicas") == TRAIN_GPUS
    finetune = dict(_by_kind("RayJob"))["rayjob-finetune.yaml"]
    groups = finetune["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(_gpus(g, "replicas") for g in groups) == TRAIN_GPUS
    assert sum(_gpus(g, "minReplicas") for g in groups) == TRAIN_GPUS
    config = _load(CONFIG_DIR / "finetune_48gpu.yaml")
    assert config["num_workers"] == TRAIN_GPUS and config["use_gpu"] is True


# job config -> the pool whose GPUs it must land on
JOB_POOLS = {"embed.yaml": "gpu-inference", "embed_incremental.yaml": "gpu-inference",
             "finetune_48gpu.yaml": "gpu-train", "retromae_24gpu.yaml": "gpu-train"}


def test_each_job_asks_for_the_gpu_type_only_its_pool_offers():
    """Training never lands on the L4 pool, embedding never on the A100 pool."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    aws = _load(AWS_YAML)["available_node_types"]
    kuberay: dict[str, list[dict[str, int]]] = {}
    for name, doc in _kuberay_docs():
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            for group in _cluster_spec(doc)["workerGroupSpecs"]:
                kuberay.setdefault(group["groupName"], []).append(_get_custom_resources(
                    {}, group["rayStartParams"], f"{name}/{group['groupName']}"))
    for config, pool in JOB_POOLS.items():
        wanted = f"accelerator_type:{_load(CONFIG_DIR / config)['accelerator_type']}"
        offering = {t for t, spec in aws.items() if wanted in spec["resources"]}
        assert offering == {pool}, (config, offering)
        for group, resources in kuberay.items():
            assert all((wanted in r) == (group == pool) for r in resources), (config, group)


def test_rayjob_entrypoints_run_the_jobs_with_example_configs():
    jobs = dict(_by_kind("RayJob"))
    expected = {
        "rayjob-embed.yaml": ("pipelines/embed_corpus.py", "embed.yaml"),
        "rayjob-finetune.yaml": ("pipelines/finetune.py", "finetune_48gpu.yaml"),
    }
    for name, (script, config) in expected.items():
        entrypoint = jobs[name]["spec"]["entrypoint"].split()
        assert entrypoint[:2] == ["python", script], name
        assert entrypoint[entrypoint.index("--config") + 1] == f"pipelines/configs/{config}"
        assert (ROOT / "pipelines" / "configs" / config).exists()
        assert yaml.safe_load(jobs[name]["spec"]["runtimeEnvYAML"])["working_dir"] == "/app"


def _cron_container() -> dict[str, Any]:
    ((_, cron),) = _by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_nightly_cronjob_uses_the_clusters_token_and_head_service():
    ((_, cron),) = _by_kind("CronJob")
    ((_, cluster),) = _by_kind("RayCluster")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    env = {e["name"]: e for e in _cron_container()["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    head_svc = f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert env["RAY_ADDRESS"]["value"] == head_svc


def _run_cron_script(tmp_path: Path, embed_root: Path) -> list[str]:
    """Run the CronJob's script with a stub `ray` that records its arguments."""
    container = _cron_container()
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    record = tmp_path / "ray_args.txt"
    stub = stub_dir / "ray"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    stub.chmod(0o755)
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    env.update(
        EMBED_ROOT=str(embed_root),
        RAY_ADDRESS="http://head:8265",
        PATH=f"{stub_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
    )
    script = container["args"][0]
    done = subprocess.run(
        container["command"] + [script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


def _entrypoint_config(args: list[str]):
    assert args[:4] == ["job", "submit", "--address=http://head:8265", "--working-dir=/app"]
    entry = args[args.index("--") + 1 :]
    assert entry[:2] == ["python", "pipelines/embed_corpus.py"]
    return parse_config(EmbedConfig, entry[2:])


def test_nightly_script_runs_full_mode_when_no_output_is_finished(tmp_path: Path):
    root = tmp_path / "emb"
    (root / "2026-01-01").mkdir(parents=True)  # a crashed run: no manifest
    cfg = _entrypoint_config(_run_cron_script(tmp_path, root))
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert cfg.mode == "full" and cfg.previous is None
    assert cfg.output == f"{root}/{today}"


def test_nightly_script_diffs_against_the_newest_finished_output(tmp_path: Path):
    root = tmp_path / "emb"
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for day, finished in [
        ("2026-01-01", True),
        ("2026-01-02", True),
        ("2026-01-03", False),
        (today, True),
    ]:
        (root / day).mkdir(parents=True)
        if finished:
            (root / day / "_manifest.json").write_text("{}")
    cfg = _entrypoint_config(_run_cron_script(tmp_path, root))
    full = _load(CONFIG_DIR / "embed.yaml")
    assert cfg.mode == "incremental"
    # newest finished run other than today's own output; unfinished runs are skipped
    assert cfg.previous.endswith(f"{root}/2026-01-02")
    assert cfg.output == f"{root}/{today}"
    assert (cfg.input, cfg.encode.model) == (full["input"], full["model"])


# ----------------------------------------------------------------------------- secrets


SECRET_KEY = re.compile(
    r"(aws_access_key_id|aws_secret_access_key|aws_session_token|auth_token|password)",
    re.IGNORECASE,
)


def _mappings(node: Any):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            yield from _mappings(value)


def test_no_credentials_are_written_in_any_yaml():
    paths = [AWS_YAML, *sorted(KUBERAY_DIR.glob("*.yaml")), *sorted(CONFIG_DIR.glob("*.yaml"))]
    for path in paths:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name}: an AWS access key id"
        for doc in yaml.safe_load_all(text):
            for mapping in _mappings(doc):
                for key, value in mapping.items():
                    if SECRET_KEY.search(str(key)) and isinstance(value, str):
                        # the one allowed form: the path of the Ray token file
                        assert value.startswith("~/.ray/"), f"{path.name}: {key} holds a secret"
                # a container env var named like a secret must come from a Secret
                if SECRET_KEY.search(str(mapping.get("name", ""))) and "value" in mapping:
                    raise AssertionError(f"{path.name}: env {mapping['name']} has a literal value")
