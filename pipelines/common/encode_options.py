"""The encode settings every job that embeds text shares, declared once.

`ModelOptions` (model, precision, lengths) is what the bulk jobs and the server share;
`EncodeOptions` adds the bulk jobs' actor pool and is nested in `EmbedConfig`,
`EvaluateConfig` and `MineConfig`; `ServeConfig` nests `ModelOptions`. The CLI
(`pipelines.common.cli`) expands a nested group's fields into the same flags with the same
defaults and checks in every job (``--model``, ``--dtype``, ``--num-actors``, ...).
`SearchOptions` is the same for the exact top-k search that evaluation and mining run,
`ChunkOptions` for long documents as token windows (embedding and evaluation).
Ray-free: configs parse without starting Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bge_core.chunking import ChunkSpec
from bge_core.config import DType
from bge_core.errors import InputError
from bge_core.presets import OFFLINE_MINILM
from pipelines.common.resources import check_accelerator, parse_count_range


@dataclass(frozen=True)
class Alias:
    """An older flag spelling kept working for users' scripts.

    Args:
        type: the flag's value type (``bool`` flags take ``--flag``, ``--flag True/False``).
        expand: turns the flag's value into the canonical settings it stands for.
        help: what to use instead (shown in ``--help``).
    """

    type: type
    expand: Any  # Callable[[value], dict[str, Any]]
    help: str


def _rename(name: str) -> Any:
    return lambda value: {name: value}


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Which model encodes and how: the settings the bulk jobs and the server share.

    `EncodeOptions` (the bulk jobs) extends it with the actor pool; the server nests it as
    its ``encoder`` group. The flags are the same everywhere (``--model``, ``--dtype``, ...).

    Args:
        model: preset name, local folder, hub id or a saved checkpoint's URI
            (`Encoder.from_pretrained`).
        dtype: compute precision (``fp16`` needs GPUs; ``int8`` runs on CPU only —
            OpenVINO, static int8 — with the `int8` extra installed on the workers;
            ``bf16`` on a CPU without native bf16 runs in fp32).
        calibration: ``int8`` only: a local text file (one text per line) whose first 300
            texts calibrate the int8 activation scales. Bulk jobs default to the first 300
            texts of the data being encoded; the server requires it. The same texts go to
            every actor / replica, and their digest is in the model fingerprint.
        max_length: token limit (default: the model's); longer text is truncated.
        max_tokens_per_batch: padded-token budget of one forward pass (default: the
            encoder's, 2,048 on CPU and 16,384 on GPU).
        accelerator_type: GPU type the workers need (e.g. ``"L4"``: Ray's
            `accelerator_type:L4` node resource); needs GPUs per worker > 0.
    """

    model: str = OFFLINE_MINILM
    dtype: DType = "fp32"
    calibration: str | None = None
    max_length: int | None = None
    max_tokens_per_batch: int | None = None
    accelerator_type: str | None = None

    ALIASES: ClassVar[dict[str, Alias]] = {
        "model_name_or_path": Alias(str, _rename("model"), "same as --model (FlagEmbedding)"),
    }

    def __post_init__(self) -> None:
        for name in ("max_length", "max_tokens_per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{_flag(name)} must be >= 1, got {value}")
        if self.calibration and self.dtype != "int8":
            raise InputError(f"--calibration {self.calibration} is for --dtype int8 only "
                             f"(got --dtype {self.dtype})")

    def check_devices(self, gpus: float, gpu_flag: str, workers: str) -> None:
        """The precision and GPU type fit `gpus` per worker: `gpu_flag` names its flag,
        `workers` what they are (``actors``, ``replicas``)."""
        check_accelerator(self.accelerator_type, gpus, type_flag="--accelerator-type",
                          gpu_flag=f"{gpu_flag} > 0")
        if self.dtype == "int8" and gpus:
            raise InputError(f"--dtype int8 runs on CPU {workers} only (OpenVINO int8): drop "
                             f"{gpu_flag}, or use fp16 / bf16 on GPUs")
        if self.dtype == "fp16" and not gpus:
            raise InputError(f"--dtype fp16 needs {gpu_flag} > 0 (fp16 runs on GPUs only; "
                             "use fp32 on CPU)")


@dataclass(frozen=True, kw_only=True)
class EncodeOptions(ModelOptions):
    """How a bulk job encodes text on Ray: `ModelOptions` plus the actor pool.

    Args:
        num_actors: actor pool size, ``"N"`` or autoscaling ``"MIN,MAX"``.
        gpus_per_actor: GPUs per actor; > 0 places the model on CUDA.
        cpus_per_actor: CPUs per actor (fractions allowed); on CPU it is also the actor's
            torch thread count. Default (None): 1 for GPU actors; for CPU actors, all but
            one of the largest node's CPUs, half of a node with fewer than 2 (one actor per
            node, room left to the read / tokenise / write tasks), with a torch thread per
            CPU of the node: the encode pool takes the cores the other stages leave free
            (`cpu_plan`).
        batch_rows: rows per Ray Data batch sent to an actor: also the window the actor
            length-sorts into micro-batches, so larger pads less (bench/batch_padding.py:
            4.9% of tokens padded at 512 rows, 1.2% at 4,096).
    """

    num_actors: str = "1"
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    batch_rows: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pool_size()
        if self.batch_rows < 1:
            raise InputError(f"--batch-rows must be >= 1, got {self.batch_rows}")
        if self.gpus_per_actor < 0 or (self.cpus_per_actor is not None
                                       and self.cpus_per_actor <= 0):
            raise InputError(f"--gpus-per-actor must be >= 0 and --cpus-per-actor > 0, got "
                             f"{self.gpus_per_actor} and {self.cpus_per_actor}")
        self.check_devices(self.gpus_per_actor, "--gpus-per-actor", "actors")

    def pool_size(self) -> int | tuple[int, int]:
        """`concurrency` for Ray Data: a fixed size or a (min, max) autoscaling range."""
        low, high = parse_count_range(self.num_actors, "--num-actors")
        return low if "," not in str(self.num_actors) else (low, high)

    def cpu_plan(self, node_cpus: float) -> tuple[float, int]:
        """(CPUs each actor asks Ray for, torch threads it runs) on nodes of `node_cpus`.

        An explicit `cpus_per_actor` is both (threads at least 1). By default a GPU actor
        asks 1 CPU; a CPU actor asks all but one of the node's CPUs (half of a node with
        fewer than 2), so Ray places one per node and the read / tokenise / write tasks
        always fit beside it (an actor holding a whole 1-CPU node left them none: the job
        hung), and runs a thread per core of the node: those tasks are short, and a thread
        idle while they run costs less than a core left idle for the whole job (what 1 CPU
        per actor did on small nodes).
        """
        if self.cpus_per_actor is not None:
            return self.cpus_per_actor, max(1, int(self.cpus_per_actor))
        if self.gpus_per_actor:
            return 1.0, 1
        return max(node_cpus / 2, float(int(node_cpus)) - 1.0), max(1, int(node_cpus))


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """Exact top-k search over corpus shards (evaluation and mining).

    Args:
        search_shard_rows: corpus embeddings scored per Ray task.
        search_cpus: CPUs per search task.
        use_gpu_for_searching: score shards on a GPU (FlagEmbedding hn_mine's flag; there
            it moves the faiss index to GPUs).
    """

    search_shard_rows: int = 65536
    search_cpus: float = 1.0
    use_gpu_for_searching: bool = False

    def __post_init__(self) -> None:
        if self.search_shard_rows < 1:
            raise InputError(f"--search-shard-rows must be >= 1, got {self.search_shard_rows}")
        if self.search_cpus <= 0:
            raise InputError(f"--search-cpus must be > 0, got {self.search_cpus}")


@dataclass(frozen=True, kw_only=True)
class ChunkOptions:
    """Long documents as token windows instead of truncation (`bge_core.chunking`).

    Args:
        chunk_tokens: split each text into windows of at most this many tokens (special
            tokens excluded), cut between words; None (default): off, longer text is
            truncated at the model's limit.
        chunk_overlap: tokens consecutive windows share (about; cuts fall between words).
    """

    chunk_tokens: int | None = None
    chunk_overlap: int = 0

    def __post_init__(self) -> None:
        if self.chunk_tokens is None and self.chunk_overlap:
            raise InputError("--chunk-overlap needs --chunk-tokens")
        self.spec()  # checks size and overlap

    @property
    def enabled(self) -> bool:
        return self.chunk_tokens is not None

    def spec(self) -> ChunkSpec | None:
        """The token windows to split texts into, or None (no chunking)."""
        if self.chunk_tokens is None:
            return None
        return ChunkSpec(self.chunk_tokens, self.chunk_overlap)


def _flag(name: str) -> str:
    return name.replace("_", "-")
