"""int8 inference on CPU: the backbone in ONNX Runtime with per-channel int8 weights.

Recipe (chosen by measurement, BENCHMARKS.md "int8 on CPU"): export the bare transformer
to ONNX, fuse attention / LayerNorm / GELU with ONNX Runtime's transformer optimizer, then
quantise every MatMul dynamically — int8 weights with one scale per output channel, uint8
activations with a scale computed per batch at run time. No calibration data is needed, so
the build is deterministic for given weights.

The quantised model is built once per model and cached on disk under its fingerprint
(``$BGE_RAY_INT8_CACHE``, default ``~/.cache/bge-ray/int8``); a file lock makes concurrent
builders on one node (several Ray actors starting together) build it once. Pooling and
normalisation stay in torch (`bge_core.pooling`), so int8 and fp32 share that code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

log = logging.getLogger(__name__)

# What the manifest records as the precision of int8 vectors; bump the version whenever the
# recipe changes the vectors, so fingerprints and cache entries change with it.
PRECISION = "int8/onnxruntime-dynamic-per-channel/v1"
CACHE_ENV = "BGE_RAY_INT8_CACHE"
MODEL_FILE = "model.onnx"
_MISSING = ("dtype 'int8' needs ONNX Runtime: pip install 'bge-ray[int8]' "
            "(onnxruntime and onnx)")


def cache_root() -> Path:
    """Folder holding one quantised model per fingerprint."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bge-ray" / "int8")


def cpu_has_vnni() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI).

    Without them, ONNX Runtime's uint8 × int8 kernels can saturate 16-bit sums, so weights
    are then quantised to 7 bits (``reduce_range``), as ONNX Runtime's docs advise.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


class Int8Backbone:
    """An ONNX Runtime session: (B, T) ids and mask → (B, T, H) float32 hidden states."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = _import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False)}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)  # (B, T, H)
        return torch.from_numpy(hidden)


def load_int8_backbone(backbone: nn.Module, fingerprint: str,
                       threads: int | None = None) -> Int8Backbone:
    """The cached int8 model for `fingerprint`, built from `backbone` if not on disk yet."""
    return Int8Backbone(quantized_model_path(backbone, fingerprint), threads)


def quantized_model_path(backbone: nn.Module, fingerprint: str,
                         root: Path | None = None) -> Path:
    """Path of the quantised ONNX model for `fingerprint`; builds it on a cache miss."""
    _import_ort()
    folder = (root or cache_root()) / f"{fingerprint}-{'vnni' if cpu_has_vnni() else 'r7'}"
    target = folder / MODEL_FILE
    if target.is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_suffix(".lock"))):  # as bge_core.remote fetches: one per node
        if target.is_file():  # another process built it while we waited
            return target
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
        try:
            build_quantized(backbone, scratch / MODEL_FILE, reduce_range=not cpu_has_vnni())
            scratch.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            scratch.rename(folder)  # atomic: readers never see a half-written model
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("built int8 model %s in %.1f s", target, time.perf_counter() - start)
    return target


def build_quantized(backbone: nn.Module, target: Path, reduce_range: bool = False) -> None:
    """Export `backbone` to ONNX, fuse it, quantise it per channel; writes only `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    work = target.parent
    exported, fused = work / "fp32.onnx", work / "fused.onnx"
    export_onnx(backbone, exported)
    config = backbone.config
    fusion = optimize_model(str(exported), model_type="bert", opt_level=1,
                            num_heads=int(config.num_attention_heads),
                            hidden_size=int(config.hidden_size))
    fusion.save_model_to_file(str(fused))
    # The fused graph holds ONNX Runtime's own ops, which ONNX shape inference cannot type:
    # tell the quantiser their outputs are float32.
    quantize_dynamic(fused, target, per_channel=True, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    for path in (exported, fused):
        path.unlink()


def export_onnx(backbone: nn.Module, path: Path) -> None:
    """The bare transformer as ONNX: (input_ids, attention_mask) → last_hidden_state."""
    ids = torch.ones(2, 8, dtype=torch.long)  # (B, T)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # padded: no all-ones shortcut traced
    names = ("input_ids", "attention_mask", "last_hidden_state")
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    was_training = backbone.training
    backbone.eval()
    try:
        # The legacy TorchScript exporter: it handles transformers' BERTs without onnxscript.
        # Its tracer warnings (shape-dependent Python branches in the mask code) concern
        # branches that take the same way for every batch; the int8 tests check that.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_HiddenStates(backbone), (ids, mask), str(path),
                              input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
    finally:
        backbone.train(was_training)


class _HiddenStates(nn.Module):
    """Keyword call of a Hugging Face model, returning only the last hidden states."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]


def _import_ort():  # noqa: ANN202 - the module object
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(_MISSING) from err
    return onnxruntime
