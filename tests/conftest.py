"""Shared fixtures: tiny random models (no downloads) and one Ray session per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A loaded 2-core machine can take longer than Ray's default to register a raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face folder holding a random 2-layer, 32-wide BERT and its tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the Ray session is a `ray` test (`make test-fast` skips them)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (2 CPUs, no dashboard) and stop it after."""
    import ray

    if not ray.is_initialized():
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        # address="local": never join a cluster another test (or process) left behind
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
