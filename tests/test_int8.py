"""int8 encoding (`bge_core.int8`, OpenVINO + NNCF static int8): close to fp32, calibrated on
the data, built once and cached, never a half-written cache entry; bf16 falls back to fp32."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_core import int8, precision
from bge_core.batching import pad_batch
from bge_core.model import Encoder
from bge_core.precision import check_dtype

TEXTS = [
    "the cat sat on the house",
    "a dog and a bird in the tree",
    "blood protein and heart disease risk",
    "vitamin diet study of cancer patient",
    "the sun the moon and a star in the night sky",
    "fast red car on the old road to the city",
    "cold water from the river to the sea",
    "new drug effect on the cell",
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One int8 cache for the module (a build takes seconds), via the environment."""
    root = tmp_path_factory.mktemp("int8_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(int8.CACHE_ENV, str(root))
        yield root


def model_files(root: Path) -> list[Path]:
    """Cache entries (a build's scratch folder, ``.build-*``, is none)."""
    return sorted(p for p in root.glob(f"*/{int8.MODEL_FILE}")
                  if not p.parent.name.startswith("."))


def test_int8_vectors_close_to_fp32(tiny_bert_dir: Path, cache: Path) -> None:
    # Mean pooling: a random tiny BERT's CLS vector is nearly the same for every text.
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean", dtype="int8")
    a, b = fp32.encode(TEXTS), q8.encode(TEXTS)  # q8 calibrates on these, its first texts
    cosine = (a * b).sum(1)  # both L2-normalised
    # Static int8 rounds weights per channel and activations on scales fixed from the
    # calibration ranges: ~0.4% relative error per matmul, 12 matmuls in 2 layers. 0.995
    # allows that with room, and stays far above the cosine of two different texts here
    # (asserted), so an engine that mixes up texts fails.
    assert cosine.min() >= 0.995
    assert (a @ a.T)[~np.eye(len(TEXTS), dtype=bool)].max() < 0.99
    assert np.abs(a - b).max() > 1e-5  # the int8 path really ran: not fp32's vectors
    assert ((b @ a.T).argmax(1) == np.arange(len(TEXTS))).all()  # nearest = its own text
    # Texts it was not calibrated on, in other batch shapes, stay close too.
    other = [t + " and the old tree" for t in reversed(TEXTS)]
    assert (fp32.encode(other) * q8.encode(other, batch_size=3)).sum(1).min() >= 0.995


def test_calibration_is_the_first_texts_encoded_and_in_the_fingerprint(
    tiny_bert_dir: Path, cache: Path
) -> None:
    lazy = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="calibration"):
        lazy.fingerprint()  # unknown until the calibration texts are
    first = lazy.encode(TEXTS)
    given = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                    calibration=TEXTS)
    assert given.fingerprint() == lazy.fingerprint()
    np.testing.assert_array_equal(given.encode(TEXTS), first)
    # later encodes keep the first calibration
    lazy.encode(TEXTS[::-1])
    assert lazy.fingerprint() == given.fingerprint()
    other = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    other.set_calibration(TEXTS[:4])  # (no build: the fingerprint needs only the texts)
    assert other.fingerprint() != given.fingerprint()
    assert other.calibration_digest != given.calibration_digest


def test_calibration_file_one_text_per_line(tiny_bert_dir: Path, cache: Path,
                                            tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")
    from_file = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                        calibration=path)
    from_list = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                        calibration=TEXTS)
    assert from_file.fingerprint() == from_list.fingerprint()
    with pytest.raises(ValueError, match=r"--calibration .*missing\.txt: cannot read"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                calibration=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text in it"):
        int8.read_calibration(tmp_path / "empty.txt")


def test_int8_model_built_once_then_loaded_from_cache(
    tiny_bert_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                    calibration=TEXTS)
    path = first.int8_backbone().path
    assert path in model_files(cache)
    mtime, entries = path.stat().st_mtime_ns, model_files(cache)

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("int8 model rebuilt despite the cache")

    monkeypatch.setattr(int8, "build_quantized", no_rebuild)
    second = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                     calibration=TEXTS)
    assert path.stat().st_mtime_ns == mtime
    assert second.int8_backbone().path == path
    assert model_files(cache) == entries
    np.testing.assert_array_equal(second.encode(TEXTS), first.encode(TEXTS))
    # Within a process the compiled model is kept: batches never rebuild or reload it.
    assert second.int8_backbone() is second.int8_backbone()


def test_a_failed_build_leaves_no_cache_entry(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(int8.CACHE_ENV, str(tmp_path))
    real_save = int8.save_model

    def save_then_fail(ov: object, model: object, target: Path) -> None:
        real_save(ov, model, target)
        target.with_suffix(".bin").write_bytes(b"truncated")  # a half-written weights file
        raise OSError("disk full")

    monkeypatch.setattr(int8, "save_model", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                calibration=TEXTS)
    # nothing but the lock file: no entry, no scratch (the next run builds; the killed-build
    # test below shows that)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


KILLED_BUILD = """
import sys, time
from bge_core import int8
from bge_core.model import Encoder
real = int8.save_model
def save_and_hang(ov, model, target):
    real(ov, model, target)
    print("saved", flush=True)
    time.sleep(600)  # killed here, the model written into its scratch folder
int8.save_model = save_and_hang
Encoder.from_pretrained(sys.argv[1], device="cpu", dtype="int8", calibration=sys.argv[2:])
"""


@pytest.mark.timeout(240)
def test_a_killed_build_leaves_nothing_a_later_run_loads(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(int8.CACHE_ENV, str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tiny_bert_dir), *TEXTS],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert any(line.strip() == "saved" for line in proc.stdout)  # NNCF prints too
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: as a node that loses power
        proc.wait(timeout=30)
    scratch = list(tmp_path.glob(".build-*"))
    assert len(scratch) == 1 and (scratch[0] / int8.MODEL_FILE).is_file()  # fully written...
    assert model_files(tmp_path) == []  # ...yet not an entry: it was never renamed in
    start = time.perf_counter()
    later = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                    calibration=TEXTS)
    assert later.int8_backbone().path.parent.name == later.fingerprint()
    assert model_files(tmp_path) == [later.int8_backbone().path]
    assert list(tmp_path.glob(".build-*")) == []  # the dead build's scratch is cleared
    assert time.perf_counter() - start < 200


def test_int8_refused_on_gpu(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="int8.*CPU only"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cuda", dtype="int8")
    with pytest.raises(ValueError, match="int8.*CPU only"):
        check_dtype("int8", torch.device("cuda:1"))


def test_fingerprint_and_precision_record_int8(tiny_bert_dir: Path, cache: Path) -> None:
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                 calibration=TEXTS)
    assert fp32.precision == "fp32"
    assert q8.precision == int8.PRECISION
    assert q8.fingerprint() != fp32.fingerprint()
    # The cache is keyed by the int8 fingerprint, so fp32 and int8 never share an entry.
    assert q8.int8_backbone().path.parent.name == q8.fingerprint()


def test_int8_engine_flushes_denormals_at_the_threads_asked(tiny_bert_dir: Path,
                                                            cache: Path) -> None:
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                 calibration=TEXTS)
    path = q8.int8_backbone().path
    compiled = int8.OpenVINOBackbone(str(path), threads=1).request.get_compiled_model()
    assert compiled.get_property("CPU_DENORMALS_OPTIMIZATION") is True
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_aligned_width_pads_only_a_short_way_to_the_multiple() -> None:
    assert int8.aligned_width(255, 16) == 256  # 0.4% more: aligned
    assert int8.aligned_width(31, 16) == 32
    assert int8.aligned_width(256, 16) == 256  # already aligned
    assert int8.aligned_width(24, 16) == 24  # 33% more: left as is
    assert int8.aligned_width(129, 16) == 129  # 12% more
    assert int8.aligned_width(37, 1) == 37  # no multiple (a CPU without AMX)


def test_batch_width_never_runs_a_width_bf16_gets_wrong() -> None:
    # OpenVINO's bf16 kernels got a 32-token batch wrong on the AMX box (bench/int8_widths.py)
    assert 32 in int8.BAD_BF16_WIDTHS
    assert int8.batch_width(32, 1, "bf16") == 33  # native 32: one masked column more
    assert int8.batch_width(31, 16, "bf16") == 31  # would align to 32: left as is
    assert int8.batch_width(30, 1, "bf16") == 30
    assert int8.batch_width(32, 1, "f32") == 32  # f32 was right
    assert int8.batch_width(255, 16, "bf16") == 256
    assert int8.batch_width(510, 16, "bf16", limit=512) == 512
    assert int8.batch_width(510, 16, "bf16", limit=511) == 510  # never past the positions
    assert int8.batch_width(32, 1, "bf16", limit=32) == 32


def test_has_amx_reads_the_cpu_flags(tmp_path: Path) -> None:
    amx, avx = tmp_path / "amx", tmp_path / "avx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    avx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni\n")
    assert int8.has_amx(amx) and not int8.has_amx(avx)
    assert not int8.has_amx(tmp_path / "missing")


def test_aligned_batches_give_the_states_of_unaligned_ones(tiny_bert_dir: Path,
                                                          cache: Path) -> None:
    # A batch padded (masked) to a multiple of 16 and cut back: the same states for the real
    # tokens as the batch run at its own width.
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                 calibration=TEXTS)
    assert q8.int8_backbone().max_width == 128  # the tiny BERT's positions: never padded past
    path = str(q8.int8_backbone().path)
    plain = int8.OpenVINOBackbone(path, threads=1, width_multiple=1)
    aligned = int8.OpenVINOBackbone(path, threads=1, width_multiple=16)
    rows, _ = q8.tokenize([" ".join(TEXTS), TEXTS[0], TEXTS[7]], 15)  # widest cut to 15
    ids, mask = pad_batch(rows, q8.text_tokenizer.pad_id)
    width = ids.shape[1]
    assert width == 15 and int8.aligned_width(width, 16) == 16  # the test pads
    a, b = plain(ids, mask), aligned(ids, mask)
    assert a.shape == b.shape == (3, width, a.shape[-1])
    real = mask.bool()
    # bf16 attention on another tiling: ~1e-2 here (exactly 0 on all-MiniLM-L6-v2 on AMX);
    # a wrong cut or an unmasked pad column moves states by tenths (two texts' first
    # token states differ by more than 0.2, asserted)
    np.testing.assert_allclose(a[real].numpy(), b[real].numpy(), atol=3e-2, rtol=0)
    assert float((a[0, 1:5] - a[2, 1:5]).abs().max()) > 0.2  # other words


def test_int8_leaves_the_callers_denormal_state_as_it_was(tiny_bert_dir: Path,
                                                           cache: Path) -> None:
    # OpenVINO's flush is switched on in the calling thread by compiling; left on, it would
    # zero every later denormal of the caller's numpy and torch code.
    assert not int8.flushing_denormals()
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                 calibration=TEXTS)
    q8.encode(TEXTS)
    assert not int8.flushing_denormals()
    assert np.float32(1e-40) * np.float32(2.0) > 0  # a denormal survives
    torch.set_flush_denormal(True)  # a caller that flushes keeps flushing
    try:
        q8.encode(TEXTS)
        assert int8.flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_saving_an_int8_encoder_writes_the_fp32_checkpoint(
    tiny_bert_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                 calibration=TEXTS)
    saved = q8.save(tmp_path / "saved")
    # The checkpoint does not pin the precision: it loads as fp32, giving fp32's vectors.
    reloaded = Encoder.from_pretrained(str(saved), device="cpu")
    assert reloaded.config.dtype == "fp32"
    np.testing.assert_allclose(reloaded.encode(TEXTS), original.encode(TEXTS), atol=1e-6)
    # Loaded as int8 again it is the same model, so the cached int8 build is reused.
    monkeypatch.setattr(int8, "build_quantized", lambda *a, **k: pytest.fail("rebuilt"))
    again = Encoder.from_pretrained(str(saved), device="cpu", dtype="int8", calibration=TEXTS)
    assert again.fingerprint() == q8.fingerprint()
    np.testing.assert_array_equal(again.encode(TEXTS), q8.encode(TEXTS))


def test_int8_without_openvino_says_what_to_install(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(int8.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails
    with pytest.raises(ImportError, match=r"bge-ray\[int8\]"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8",
                                calibration=TEXTS)


def test_bf16_without_native_bf16_warns_once_and_runs_fp32(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="bge_core.precision"):
        enc = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="bf16")
    warned = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(warned) == 1 and "fp32 instead" in warned[0]
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    assert (enc.config.dtype, enc.precision) == ("fp32", "fp32")
    assert enc.fingerprint() == fp32.fingerprint()
    # fp32's vectors to float rounding (bf16 would be ~1e-3 away)
    np.testing.assert_allclose(enc.encode(TEXTS), fp32.encode(TEXTS), atol=1e-6)
