"""int8 inference on CPU: the backbone in OpenVINO, quantised statically by NNCF.

Recipe (chosen by measurement, BENCHMARKS.md "int8 on CPU"): convert the bare transformer
to OpenVINO IR, then let NNCF quantise it statically (``ModelType.TRANSFORMER``: int8
weights and activations with scales fixed from calibration statistics, SmoothQuant on the
MatMul inputs, fast bias correction). What stays in floating point (attention's own matmuls
and softmax, LayerNorm, GELU, residual adds) runs in bf16 where the CPU has it natively
(AVX512-BF16 or AMX: OpenVINO's default there, and what sentence-transformers' OpenVINO
backend runs), in f32 elsewhere. Static scales need calibration data; it comes from the
data being encoded — the first `CALIBRATION_TEXTS` texts an encoder is given, or a
calibration file — never from a download. The calibration set is part of the recipe: its
digest is in the fingerprint, so two runs share vectors (and a cache entry) only when they
share weights, settings and calibration texts.

The quantised model is built once per fingerprint and node, and cached on disk
(``$BGE_RAY_INT8_CACHE``, default ``~/.cache/bge-ray/int8``); a file lock makes concurrent
builders on one node (several Ray actors starting together) build it once, and a build is
written to a scratch folder renamed into place when complete, so an interrupted build never
leaves an entry that a later run loads. Pooling and normalisation stay in torch
(`bge_core.pooling`), so int8 and fp32 share that code. On a CPU with AMX a batch is padded
(masked) to a width that is a multiple of 16 where that adds little (`aligned_width`): the
padding changes no real token's state, and AMX runs such widths faster. A width OpenVINO's
bf16 kernels get wrong (`BAD_BF16_WIDTHS`) is never run: one masked column is added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import torch
from filelock import FileLock
from torch import nn

from bge_core.errors import InputError
from bge_core.storage import write_then_move

log = logging.getLogger(__name__)

# What the manifest records as the precision of int8 vectors; bump the version whenever the
# recipe changes the vectors, so fingerprints and cache entries change with it.
PRECISION = "int8/openvino-nncf-static-smoothquant-bf16rest-ftz/v4"
CACHE_ENV = "BGE_RAY_INT8_CACHE"
MODEL_FILE = "model.xml"  # beside it: model.bin (the weights)
CALIBRATION_TEXTS = 300  # how many texts calibrate the activation scales
AMX_WIDTH_MULTIPLE = 16  # AMX tiles are 16 rows: other batch widths hit slower tail code
ALIGN_SLACK = 0.08  # the most padding (share of the width) worth adding to align it
# Widths OpenVINO 2026.4's bf16 kernels get wrong: on the AMX box a batch exactly 32 tokens
# wide came out with 7x the error against fp32 of 31 or 33 (mean |state error| 0.165 vs
# 0.022; f32 was right; BENCHMARKS.md). Scan a CPU with `bench/int8_widths.py`.
BAD_BF16_WIDTHS = frozenset({32})
_MISSING = ("dtype 'int8' needs OpenVINO and NNCF: pip install 'bge-ray[int8]' "
            "(openvino and nncf)")

TokenRows = Sequence[Sequence[int]]


def cache_root() -> Path:
    """Folder holding one quantised model per fingerprint."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bge-ray" / "int8")


def calibration_digest(rows: TokenRows) -> str:
    """Short sha256 of the calibration token ids (what the fingerprint records)."""
    digest = hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode())
    return digest.hexdigest()[:16]


def float_precision() -> str:
    """Precision of the int8 model's floating-point ops on this CPU: ``bf16`` where OpenVINO
    has native bf16 kernels (AVX512-BF16 / AMX), else ``f32``. On passages bf16 here made
    int8 ≈ 1.2× faster (the attention and LayerNorm share grows with length; BENCHMARKS.md)."""
    capabilities = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


def compile_options(threads: int | None, precision: str | None = None) -> dict[str, object]:
    """OpenVINO CPU settings: one stream of `threads` threads, latency mode, the
    floating-point precision of what is not int8 (default `float_precision`), and denormals
    flushed to zero: on the AVX-512 box, idle, int8 ran 1.06× faster on passages and 1.07×
    on sentences with the flush (BENCHMARKS.md, issue 24); a value under 1e-38 (a tiny
    attention probability, say) adds nothing to a vector."""
    return {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": precision or float_precision(),
            "CPU_DENORMALS_OPTIMIZATION": True}


def flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (its FTZ/DAZ state)."""
    tiny = np.array([1e-40], dtype=np.float32)  # a float32 denormal
    return bool((tiny * np.float32(1.0))[0] == 0)


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormals on this thread inside the block only: OpenVINO's denormal setting
    turns the calling thread's flush on (compiling sets it, and the caller takes part in
    inference), and left on it would change every later float op of the caller's thread
    (numpy, torch, the user's own code)."""
    was = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was:
            torch.set_flush_denormal(False)


def has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX tiles (Linux's ``amx_tile`` flag; False where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_tile" in line.split()
               for line in text.splitlines())


def aligned_width(width: int, multiple: int, slack: float = ALIGN_SLACK) -> int:
    """`width` rounded up to a multiple of `multiple` when that adds at most `slack` of it
    in padding, else `width` as is: on an AMX CPU a batch 255 tokens wide took 1.24× as long
    as one 256 wide, 24 → 32 lost 6% (`bench/int8_widths.py --timing`, BENCHMARKS.md), so
    only a short pad pays."""
    up = -(-width // multiple) * multiple
    return up if up - width <= slack * width else width


def batch_width(width: int, multiple: int, precision: str, limit: int | None = None) -> int:
    """The width a (B, `width`) batch runs at: `aligned_width`, but never one of
    `BAD_BF16_WIDTHS` in bf16 (one more masked column instead), and never past `limit`
    (the model's position table)."""
    chosen = aligned_width(width, multiple)
    if precision == "bf16" and chosen in BAD_BF16_WIDTHS:
        chosen = width if width not in BAD_BF16_WIDTHS else width + 1
    return chosen if limit is None or chosen <= limit else width


class OpenVINOBackbone:
    """A compiled OpenVINO model: (B, T) ids and mask → (B, T, H) float32 hidden states.

    `width_multiple` (default: `AMX_WIDTH_MULTIPLE` on a CPU with AMX, else 1): batches are
    padded (masked) to the width `batch_width` picks, at most `max_width` (the model's
    positions), and the states cut back to T."""

    def __init__(self, model: object, threads: int | None = None, precision: str | None = None,
                 path: Path | None = None, width_multiple: int | None = None,
                 max_width: int | None = None) -> None:
        ov = import_openvino()
        self.path = path
        self.max_width = max_width
        self.width_multiple = width_multiple or (AMX_WIDTH_MULTIPLE if has_amx() else 1)
        self.precision = precision or float_precision()
        with denormals_flushed():  # compiling turns the flush on: restored after
            compiled = ov.Core().compile_model(model, "CPU",
                                               compile_options(threads, self.precision))
        self.request = compiled.create_infer_request()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.cpu().numpy().astype(np.int64, copy=False)
        mask = attention_mask.cpu().numpy().astype(np.int64, copy=False)
        width = ids.shape[1]
        extra = batch_width(width, self.width_multiple, self.precision, self.max_width) - width
        if extra:  # masked columns: no real token attends to them
            ids, mask = (np.pad(a, ((0, 0), (0, extra))) for a in (ids, mask))
        feeds = {"input_ids": ids, "attention_mask": mask}
        with denormals_flushed():  # zero-copy in and out: one copy, of the first T columns
            hidden = self.request.infer(feeds, share_inputs=True, share_outputs=True)[0]
            # (B, T', H) in the request's own buffer, which the next call overwrites
            return torch.from_numpy(np.array(hidden[:, :width], dtype=np.float32))


Int8Backbone = OpenVINOBackbone  # the int8 model is an OpenVINO model of int8 ops


def load_int8_backbone(backbone: nn.Module, fingerprint: str, calibration: TokenRows,
                       threads: int | None = None) -> OpenVINOBackbone:
    """The cached int8 model for `fingerprint`, built from `backbone` if not on disk yet."""
    path = quantized_model_path(backbone, fingerprint, calibration)
    positions = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    return OpenVINOBackbone(str(path), threads, path=path, max_width=positions)


def quantized_model_path(backbone: nn.Module, fingerprint: str, calibration: TokenRows,
                         root: Path | None = None) -> Path:
    """Path of the quantised model for `fingerprint`; builds it on a cache miss."""
    import_openvino()
    folder = (root or cache_root()) / fingerprint
    target = folder / MODEL_FILE
    if target.is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_suffix(".lock"))):  # as bge_core.remote fetches: one per node
        if target.is_file():  # another process built it while we waited
            return target
        for stale in folder.parent.glob(f".build-{fingerprint}-*"):  # a killed build's
            shutil.rmtree(stale, ignore_errors=True)  # (we hold the lock: none is running)
        start = time.perf_counter()
        # readers never see a half-written model: built under `.build-*`, renamed when done
        with write_then_move(fsspec.filesystem("file"), str(folder), tag="build") as scratch:
            Path(scratch).mkdir()
            build_quantized(backbone, Path(scratch) / MODEL_FILE, calibration)
        log.info("built int8 model %s from %d calibration texts in %.1f s", target,
                 len(calibration), time.perf_counter() - start)
    return target


def build_quantized(backbone: nn.Module, target: Path, calibration: TokenRows) -> None:
    """Convert `backbone`, quantise it on `calibration` (token id rows); writes `target`
    and its ``.bin`` only."""
    ov = import_openvino()
    import nncf

    if not calibration:
        raise ValueError("int8 calibration needs at least one text")
    model = convert_backbone(backbone)
    # One text per item: NNCF collects activation ranges per item, and no padding enters
    # the statistics.
    items = [{"input_ids": np.asarray([row], dtype=np.int64),
              "attention_mask": np.ones((1, len(row)), dtype=np.int64)} for row in calibration]
    previous = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its progress bars and notes
    try:
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                  model_type=nncf.ModelType.TRANSFORMER)
    finally:
        logging.getLogger("nncf").setLevel(previous)
    save_model(ov, quantized, target)


def save_model(ov: object, model: object, target: Path) -> None:
    """Write the IR (``.xml`` + ``.bin``), weights kept at their precision."""
    ov.save_model(model, str(target), compress_to_fp16=False)


def convert_backbone(backbone: nn.Module) -> object:
    """The bare transformer as an OpenVINO model: (input_ids, attention_mask) →
    last_hidden_state, both dynamic in batch and length."""
    ov = import_openvino()
    ids = torch.ones(2, 8, dtype=torch.long)  # (B, T)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # padded: no all-ones shortcut traced
    was_training = backbone.training
    backbone.eval()
    try:
        # Tracer warnings concern shape-dependent branches in the mask code that take the
        # same way for every batch; the int8 tests check vectors on other shapes.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(_HiddenStates(backbone),
                                     example_input={"input_ids": ids, "attention_mask": mask})
    finally:
        backbone.train(was_training)
    for port, name in zip(model.inputs, ("input_ids", "attention_mask")):
        port.get_tensor().set_names({name})
    model.reshape({name: ov.PartialShape([-1, -1]) for name in ("input_ids", "attention_mask")})
    return model


class _HiddenStates(nn.Module):
    """Keyword call of a Hugging Face model, returning only the last hidden states."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]


def import_openvino():  # noqa: ANN201 - the module object
    try:
        import nncf  # noqa: F401 - checked here so the error names both
        import openvino
    except ImportError as err:
        raise ImportError(_MISSING) from err
    return openvino


def read_calibration(path: str | Path) -> list[str]:
    """Calibration texts from a UTF-8 file, one text per line (the first non-empty ones).

    Raises:
        ValueError: the file is missing, unreadable or holds no text (names it).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()][:CALIBRATION_TEXTS]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--calibration {path}: cannot read it ({err})") from None
    if not texts:
        raise InputError(f"--calibration {path}: no text in it (one text per line)")
    return texts
