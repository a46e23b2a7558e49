"""Online embeddings on Ray Serve: OpenAI-compatible ``/v1/embeddings`` with the bulk job's model.

    BGE_SERVE_API_KEY=... python pipelines/serve_embeddings.py --model bge-base-en-v1.5 \
        --host 0.0.0.0 --port 8000
    serve run pipelines/configs/serve.yaml          # or `serve deploy` to a running cluster

Starts a local Ray unless ``RAY_ADDRESS`` names a cluster, and serves until stopped.
Requests from concurrent callers are gathered by tokens (`pipelines.serve.batcher`: up to
``--max-batch-tokens`` per encoder call, a bigger request split across calls) and encoded
together in the encoder's length-sorted token-budget micro-batches, on a thread of their own
while the replica's event loop parses, tokenises (on worker threads) and answers.
``input_type: query`` adds the model's query instruction (`Encoder.encode_queries`);
``passage`` (default) embeds text as given.
Set ``BGE_SERVE_API_KEY`` to require ``Authorization: Bearer <key>`` on every ``/v1/*``
request (``/health`` stays open for probes). Without a key the server binds only loopback:
any other address (``--host 0.0.0.0``, or Serve's ``http_options`` for ``serve run`` /
``serve deploy``) is refused unless ``--allow-unauthenticated`` says so on purpose.
Past ``--max-queued-requests`` waiting requests, callers get 429 at once.

In Serve's throughput-optimised mode (the CLI's default) each replica also answers HTTP on a
port of its own (Serve's direct ingress, 30000 up); the startup log names them
(`direct_urls`). The port given by ``--port`` is Serve's proxy, a Python process that
forwards each request to a replica: on the 2-core box it added ≈ 10 ms to a one-client
request (BENCHMARKS.md, issue 26). For the encoder's speed, put a load balancer (HAProxy:
Serve's ``RAY_SERVE_ENABLE_HA_PROXY=1``, or the platform's) in front of the replicas' own
ports. They check the same key.
"""

# No `from __future__ import annotations` here: run as a script, ServeConfig lives in
# `__main__` and travels to the replicas by value, where string annotations ("DType")
# could not be resolved by `config_from_dict`'s `get_type_hints`.
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from bge_core.errors import InputError
from bge_core.model import Encoder
from pipelines.common.cli import config_from_dict, run_main
from pipelines.common.encode_options import ModelOptions
from pipelines.common.resources import parse_count_range
from pipelines.serve.api import (
    ServedModel,
    build_api,
    check_exposure,
    is_loopback,
    resolve_api_key,
)
from pipelines.serve.batcher import TokenBatcher

log = logging.getLogger("serve_embeddings")


THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Serve an encoder as an OpenAI-compatible embeddings endpoint on Ray Serve."""

    # --model, --dtype, --calibration, --max-length, --max-tokens-per-batch,
    # --accelerator-type: declared once with the bulk jobs (int8 here needs --calibration:
    # a replica calibrating on whatever it is asked first would differ from the others)
    encoder: ModelOptions = field(default_factory=ModelOptions)
    served_model_name: str | None = None  # the `model` id reported; default --model
    host: str = "127.0.0.1"  # CLI only (`serve run` reads http_options from its config)
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "bge-embeddings"
    query_instruction_for_retrieval: str | None = None  # "" = none; default the model's own
    replicas: str = "1"  # "N" or "MIN,MAX" (autoscaling)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_inputs_per_request: int = 512
    max_request_bytes: int = 8_000_000
    # tokens (without padding) of many requests gathered into one encoder call; a request
    # with more is split across calls. Default: one forward pass's budget (the encoder's
    # max_tokens_per_batch: 2,048 on CPU), so while one call encodes, the answers of the
    # last one go out and new requests come in (one call of every waiting request left the
    # encoder idle during that round trip: 0.63x in-process at 32 clients)
    max_batch_tokens: int | None = None
    # how long a request waits for company when the encoder is idle: 0 = encode at once;
    # requests arriving meanwhile form the next batch (a wait only delays a lone request)
    batch_wait_timeout_s: float = 0.0
    max_ongoing_requests: int = 64  # per replica: queued for a batch + being encoded
    max_queued_requests: int = 128  # waiting at the proxy beyond that; then 429
    # CLI only: start the local Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (a cluster's
    # processes take it from their own environment: see serve.yaml)
    throughput_optimized: bool = True
    allow_unauthenticated: bool = False  # serve a non-loopback address without an API key

    def __post_init__(self) -> None:
        self.replica_range()
        self.encoder.check_devices(self.gpus_per_replica, "--gpus-per-replica", "replicas")
        if self.encoder.dtype == "int8" and not self.encoder.calibration:
            raise InputError("--dtype int8 needs --calibration: a text file (one text per "
                             "line) like the texts served, the same for every replica (the "
                             "embed job's --calibration file, if it had one)")
        for name in ("max_inputs_per_request", "max_request_bytes", "max_batch_tokens",
                     "max_ongoing_requests", "port"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise InputError(f"--max-queued-requests must be >= 0, got "
                             f"{self.max_queued_requests}")
        if self.batch_wait_timeout_s < 0:
            raise InputError(f"--batch-wait-timeout-s must be >= 0, got "
                             f"{self.batch_wait_timeout_s}")

    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas from ``N`` or ``MIN,MAX``."""
        return parse_count_range(self.replicas, "--replicas")

    def encoder_overrides(self) -> dict[str, Any]:
        """`Encoder.from_pretrained` overrides: only what was set, so the model's own stay."""
        values = {"dtype": self.encoder.dtype, "max_length": self.encoder.max_length,
                  "query_instruction": self.query_instruction_for_retrieval,
                  "max_tokens_per_batch": self.encoder.max_tokens_per_batch}
        return {k: v for k, v in values.items() if v is not None}


def _flag(name: str) -> str:
    return name.replace("_", "-")


@serve.deployment
@serve.ingress()  # the app comes from `__serve_build_asgi_app__`, after __init__
class Embedder:
    """One replica: an `Encoder`, the HTTP app of `build_api`, and the token batcher."""

    def __init__(self, settings: dict[str, Any], api_key: str | None) -> None:
        self.cfg = config_from_dict(ServeConfig, settings, source="serve settings")
        device = "cuda" if self.cfg.gpus_per_replica > 0 else "cpu"
        self.encoder = Encoder.from_pretrained(self.cfg.encoder.model, device=device,
                                               calibration=self.cfg.encoder.calibration,
                                               **self.cfg.encoder_overrides())
        _, forward_tokens = self.encoder.config.batch_limits(device)
        self.batcher = TokenBatcher(self.encoder.encode_tokenized,
                                    max_tokens=self.cfg.max_batch_tokens or forward_tokens,
                                    wait_s=self.cfg.batch_wait_timeout_s)
        self.served = ServedModel(
            encoder=self.encoder, encode=self.batcher.encode, api_key=api_key,
            name=self.cfg.served_model_name or self.cfg.encoder.model,
            created=int(time.time()), max_inputs=self.cfg.max_inputs_per_request,
            max_bytes=self.cfg.max_request_bytes)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.served)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """`Deployment.options` for `cfg`: resources, replica count or autoscaling, backpressure."""
    low, high = cfg.replica_range()
    scaling: dict[str, Any] = (
        {"num_replicas": low} if low == high else
        {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                # scale out once replicas are half full on average
                                "target_ongoing_requests": max(1, cfg.max_ongoing_requests // 2)}})
    actor: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    if cfg.encoder.accelerator_type:
        actor["accelerator_type"] = cfg.encoder.accelerator_type
    return {
        "ray_actor_options": actor,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        # over the queue limit the proxy answers 429 at once (Serve's default is 503)
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        **scaling,
    }


def build_app(cfg: ServeConfig, api_key: str | None = None) -> Application:
    """The Serve application for `cfg`; `api_key` defaults to ``$BGE_SERVE_API_KEY``."""
    deployment = Embedder.options(**deployment_options(cfg))
    return deployment.bind(asdict(cfg), resolve_api_key(api_key))


def serve_http_host() -> str | None:
    """The host the running Serve instance's HTTP proxies bind; None when unknown."""
    import ray

    if not ray.is_initialized():
        return None
    try:  # Serve has no public API for its HTTP options; unknown means "maybe exposed"
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # any failure leaves the host unknown, i.e. guarded
        return None


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for ``serve run`` / ``serve deploy``: the application's `args` are ServeConfig.

    Refuses (`InputError`) when Serve's proxies may bind a non-loopback address, no
    ``$BGE_SERVE_API_KEY`` is set and ``allow_unauthenticated`` is not true.
    """
    cfg = config_from_dict(ServeConfig, dict(args), source="serve application args")
    check_exposure(serve_http_host(), resolve_api_key(), cfg.allow_unauthenticated)
    return build_app(cfg)


def direct_urls(app_name: str, proxy_port: int | None = None,
                host: str | None = None) -> list[str]:
    """Base URLs (``http://ip:port`` + route prefix) at which `app_name`'s replicas answer
    HTTP themselves (Serve's direct ingress, throughput-optimised mode); [] without it or
    where Serve does not say. A target on `proxy_port` is Serve's proxy, not a replica, and
    is left out; a loopback `host` (what the replicas bind then) replaces the node's IP."""
    try:  # Serve's controller lists them for load balancers (`TargetGroup`); private call
        import ray
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return []
        groups = ray.get(client._controller.get_target_groups.remote(app_name), timeout=30)
    except Exception:  # an older or newer Serve without it: nothing to report
        return []
    return targets_to_urls(groups, app_name, proxy_port, host)


def targets_to_urls(groups: Any, app_name: str, proxy_port: int | None,
                    host: str | None = None) -> list[str]:
    """`direct_urls` from Serve's target groups: the HTTP ones of `app_name`, in order."""
    urls: list[str] = []
    for group in groups:
        if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP":
            continue
        if getattr(group, "app_name", app_name) not in ("", app_name):
            continue
        prefix = str(getattr(group, "route_prefix", "") or "").rstrip("/")
        urls += [f"http://{_netloc(host if host and is_loopback(host) else t.ip)}:{t.port}{prefix}"
                 for t in group.targets
                 if t.port != proxy_port]
    return list(dict.fromkeys(urls))


def _netloc(ip: str) -> str:
    return f"[{ip.strip('[]')}]" if ":" in ip else ip  # an IPv6 address in a URL


def start(cfg: ServeConfig, api_key: str | None = None) -> None:
    """Deploy on the connected Ray cluster (HTTP on cfg.host:cfg.port) and return.

    Raises:
        InputError: `cfg.host` is not loopback, there is no API key and
            `cfg.allow_unauthenticated` is off.
    """
    check_exposure(cfg.host, resolve_api_key(api_key), cfg.allow_unauthenticated)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, api_key), name=cfg.app_name, route_prefix=cfg.route_prefix)


def run(cfg: ServeConfig) -> None:
    """Deploy, then serve until Ctrl-C (which deletes the application)."""
    try:
        start(cfg)
        log.info("serving %s at http://%s:%d%sv1/embeddings", cfg.encoder.model, cfg.host, cfg.port,
                 cfg.route_prefix.rstrip("/") + "/")
        direct = direct_urls(cfg.app_name, cfg.port, cfg.host)
        if direct:
            log.info("replicas answer directly (no proxy hop; put a load balancer in front "
                     "of them): %s", ", ".join(direct))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: deleting application %s", cfg.app_name)
        serve.delete(cfg.app_name)


def _preflight(cfg: ServeConfig) -> None:
    check_exposure(cfg.host, resolve_api_key(), cfg.allow_unauthenticated)
    if cfg.throughput_optimized:  # read by the local Ray's processes, started after this
        os.environ.setdefault(THROUGHPUT_ENV, "1")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 2 with one clear line on bad flags or config, or an unguarded host
    (before Ray starts)."""
    return run_main("serve_embeddings", ServeConfig, run, argv, preflight=_preflight)


if __name__ == "__main__":
    sys.exit(main())
