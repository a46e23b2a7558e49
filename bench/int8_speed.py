"""CPU encode speed: ours (fp32, bf16, int8) vs sentence-transformers fp32 and its
OpenVINO-qint8 (and ONNX-qint8) backends; plus ours on a bge-base-sized random model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_speed.py [--rounds 5] [--passages 200] \
        [--openvino-python /tmp/peers/ov/bin/python] [--onnx-python /tmp/peers/ort/bin/python] \
        [--peer-model-dir /tmp/peers/minilm] [--peer-ftz] [--base] [--json out.json]

Each engine is a long-lived worker process (this file with ``--worker NAME``) holding its
model; the driver asks them in turn to encode the same texts (STS-B test sentences, the first
`--passages` NFCorpus passages), one engine at a time, round after round, rotating the order
each round. On a shared machine the load drifts, so each round's ratio (engine rows/s ÷ ST
fp32 rows/s, both from that round) is reported as a median over rounds; STS-B Spearman is
computed from each engine's vectors. Our int8 calibrates on the data it encodes (the first
150 sentences and 150 passages of the two sets), as `Encoder` does by default.

``--base`` adds ``st-fp32@base`` and ``ours-{fp32,bf16,int8}@base``: a random-weight BERT of
bge-base's shape (12 layers × 768, MiniLM's tokenizer, mean pooling), so the ratios are not
a MiniLM artefact (its STS-B score means nothing). ``lscpu``'s model and flags go into the
results.

sentence-transformers' ONNX / OpenVINO backends need optimum stacks that would replace this
project's transformers, so they run from their own virtual environments (`--onnx-python`,
`--openvino-python`), on a model folder prepared there once:

    /tmp/peers/ort/bin/python bench/int8_speed.py --export onnx      # into --peer-model-dir
    /tmp/peers/ov/bin/python bench/int8_speed.py --export openvino

``onnx`` writes ``onnx/model_qint8_avx512_vnni.onnx`` (sentence-transformers'
`export_dynamic_quantized_onnx_model`, its ``avx512_vnni`` config); ``openvino`` writes
``openvino/openvino_model_qint8_quantized.xml`` (NNCF static int8 as in
`export_static_quantized_openvino_model`, 300 calibration sentences from the STS-B *train*
split in place of its default GLUE SST-2 download).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ONNX_FILE = "onnx/model_qint8_avx512_vnni.onnx"
OV_FILE = "openvino/openvino_model_qint8_quantized.xml"
ST_BATCH = 32  # sentence-transformers' default batch size
BASE_DIR = Path(tempfile.gettempdir()) / "bge_ray_bench_base"  # the random bge-base-sized BERT


def encoder_for(name: str, model_dir: str, sets: dict):  # noqa: ANN201 - texts → (n, D)
    """The encode function of one engine (imports only what that engine needs)."""
    name, _, which = name.partition("@")
    if which == "base":
        model_dir = str(BASE_DIR)
    if name.startswith("ours"):
        sys.path.insert(0, str(ROOT))
        from bge_core import Encoder

        dtype = name.split("-")[1]
        calibration = sets["stsb"][:150] + sets["nfcorpus"][:150] if dtype == "int8" else None
        enc = Encoder.from_pretrained(model_dir if which else "all-MiniLM-L6-v2",
                                      device="cpu", dtype=dtype, calibration=calibration,
                                      **({"pooling": "mean"} if which else {}))
        return enc.encode
    from sentence_transformers import SentenceTransformer

    kwargs: dict = {}
    if name == "st-onnx-qint8":
        kwargs = {"backend": "onnx", "model_kwargs": {"file_name": ONNX_FILE}}
    elif name.startswith("st-openvino-qint8"):
        kwargs = {"backend": "openvino", "model_kwargs": {"file_name": OV_FILE}}
        if name.endswith("-ftz"):  # the peer with our engine's denormal setting added
            kwargs["model_kwargs"]["ov_config"] = {"PERFORMANCE_HINT": "LATENCY",
                                                   "CPU_DENORMALS_OPTIMIZATION": "YES"}
    model = SentenceTransformer(model_dir, device="cpu", **kwargs)
    return lambda texts: model.encode(texts, batch_size=ST_BATCH)


def worker(name: str, texts_file: str, model_dir: str) -> None:
    """Serve ``SET`` (encode, reply seconds) and ``save SET PATH`` lines from stdin."""
    sets = json.loads(Path(texts_file).read_text())
    encode = encoder_for(name, model_dir, sets)
    for texts in sets.values():
        encode(texts[:64])  # warm-up: first-call allocations, lazy graph compilation
    last: dict = {}
    print(json.dumps({"ready": name}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if parts[0] == "save":
            np.save(parts[2], last[parts[1]])
            print(json.dumps({"saved": parts[2]}), flush=True)
            continue
        start = time.perf_counter()
        last[parts[0]] = np.asarray(encode(sets[parts[0]]), dtype=np.float32)
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


def export_peer(kind: str, model_dir: str) -> None:
    """Write sentence-transformers' qint8 ONNX or OpenVINO model into `model_dir`."""
    from sentence_transformers import SentenceTransformer

    if kind == "onnx":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        model = SentenceTransformer(model_dir, device="cpu", backend="onnx")
        export_dynamic_quantized_onnx_model(model, "avx512_vnni", model_dir)
        return
    import shutil

    from datasets import Dataset
    from optimum.intel import OVConfig, OVQuantizationConfig, OVQuantizer

    model = SentenceTransformer(model_dir, device="cpu", backend="openvino")
    with open(SHARED / "stsb" / "sts-train.csv", encoding="utf-8") as handle:
        sentences = [line.split("\t")[5] for line in handle][:300]
    calibration = Dataset.from_dict({"sentence": sentences}).map(
        lambda rows: model.tokenizer(rows["sentence"], padding="max_length", max_length=384,
                                     truncation=True),
        batched=True, remove_columns=["sentence"])
    config = OVConfig(quantization_config=OVQuantizationConfig())
    quantizer = OVQuantizer.from_pretrained(model.transformers_model)
    with tempfile.TemporaryDirectory() as out:
        quantizer.quantize(calibration_dataset=calibration, save_directory=out, ov_config=config)
        if not list(Path(out).rglob("*.xml")):  # this optimum-intel quantises in place
            model.transformers_model.save_pretrained(out)
        xml = next(Path(out).rglob("*.xml"))
        target = Path(model_dir) / OV_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".xml", ".bin"):
            shutil.copy(xml.with_suffix(suffix), target.with_suffix(suffix))


def make_base_model(source: str) -> None:
    """A random BERT of bge-base's shape beside MiniLM's tokenizer, in `BASE_DIR`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (BASE_DIR / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=768,
                                 num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, max_position_embeddings=512),
                      add_pooling_layer=False)
    scratch = Path(tempfile.mkdtemp(dir=BASE_DIR.parent))
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    scratch.rename(BASE_DIR)


def cpu_description() -> dict:
    """``lscpu``'s model name and the flags that decide the kernels (VNNI, BF16, AMX)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "").strip(), "cpus": fields.get("CPU(s)", "").strip(),
            "flags": [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))]}


class Worker:
    """Driver-side handle of one engine's worker process."""

    def __init__(self, name: str, python: str, texts_file: str, model_dir: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", name, "--texts", texts_file,
             "--peer-model-dir", model_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ask(None)

    def ask(self, line: str | None) -> dict:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        while True:  # skip anything a library printed on stdout
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"worker {self.name} exited")
            if reply.startswith("{"):
                return json.loads(reply)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def drive(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.data import nfcorpus_passages, stsb_test
    from bge_core.metrics import spearman

    left, right, gold = stsb_test()
    sets = {"stsb": left + right, "nfcorpus": nfcorpus_passages(args.passages)}
    engines = {n: sys.executable for n in ("st-fp32", "ours-fp32", "ours-bf16", "ours-int8")}
    if args.onnx_python:
        engines["st-onnx-qint8"] = args.onnx_python
    if args.openvino_python:
        engines["st-openvino-qint8"] = args.openvino_python
        if args.peer_ftz:
            engines["st-openvino-qint8-ftz"] = args.openvino_python
    if args.base:
        make_base_model(args.peer_model_dir)
        engines.update({f"{n}@base": sys.executable
                        for n in ("st-fp32", "ours-fp32", "ours-bf16", "ours-int8")})
    tmp = Path(tempfile.mkdtemp(prefix="int8_speed_"))
    texts_file = tmp / "texts.json"
    texts_file.write_text(json.dumps(sets))
    workers = {n: Worker(n, py, str(texts_file), args.peer_model_dir) for n, py in engines.items()}
    times: dict = {n: {s: [] for s in sets} for n in engines}
    names = list(engines)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for set_name in sets:
                times[name][set_name].append(workers[name].ask(set_name)["s"])
        print(json.dumps({"round": r, "s": {n: {s: round(v[-1], 3) for s, v in t.items()}
                                             for n, t in times.items()}}), flush=True)
    results: dict = {"rounds": args.rounds, "sets": {s: len(t) for s, t in sets.items()},
                     "cpu": cpu_description(), "engines": {}}
    for name, worker_ in workers.items():
        worker_.ask(f"save stsb {tmp / name}.npy")
        worker_.close()
        vectors = np.load(tmp / f"{name}.npy")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        n = len(left)
        row: dict = {"stsb_spearman": 100 * spearman((vectors[:n] * vectors[n:]).sum(1), gold)}
        reference = "st-fp32@base" if name.endswith("@base") else "st-fp32"
        for set_name, texts in sets.items():
            own, base = times[name][set_name], times[reference][set_name]
            row[set_name] = {
                "rows_s_median": len(texts) / statistics.median(own),
                "x_st_fp32_median": statistics.median(b / o for b, o in zip(base, own)),
                "x_st_fp32_min_max": [min(b / o for b, o in zip(base, own)),
                                      max(b / o for b, o in zip(base, own))]}
            if "st-openvino-qint8" in times and not name.endswith("@base"):
                peer = times["st-openvino-qint8"][set_name]  # the target: ≥ 1.15× this
                row[set_name]["x_st_openvino_qint8_median"] = statistics.median(
                    p / o for p, o in zip(peer, own))
        results["engines"][name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passages", type=int, default=200)
    parser.add_argument("--base", action="store_true",
                        help="also time a random bge-base-sized model (12 x 768)")
    parser.add_argument("--onnx-python", default=None)
    parser.add_argument("--openvino-python", default=None)
    parser.add_argument("--peer-ftz", action="store_true",
                        help="also time the OpenVINO peer with denormals flushed, as ours runs")
    parser.add_argument("--peer-model-dir", default="/tmp/peers/minilm")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", choices=["onnx", "openvino"], default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.texts, args.peer_model_dir)
    if args.export:
        return export_peer(args.export, args.peer_model_dir)
    results = drive(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
