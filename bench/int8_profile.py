"""Where int8 passage time goes: our OpenVINO model vs sentence-transformers' OpenVINO-qint8
export, op by op, on the same batches.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/int8_profile.py \
        [--peer-xml /tmp/peers/minilm/openvino/openvino_model_qint8_quantized.xml] \
        [--passages 200] [--batch 32] [--rounds 3] [--threads 2] [--json out.json]

Both models are compiled here, by this project's OpenVINO, with the same settings
(`bge_core.int8.compile_options`: one latency stream, the CPU's float precision, denormals
flushed) plus ``PERF_COUNT``, and fed the same length-sorted batches of `--batch` NFCorpus
passages (all-MiniLM-L6-v2's tokenizer, 256 tokens at most: what sentence-transformers
feeds its model). The peer's model is also run at the settings its backend uses (latency
hint only). Per engine: the best of `--rounds` passes, and the profiled time per op type
(the last pass) with the kernel OpenVINO chose. The dense layers' multiply-accumulates
(6 layers × (4·H² + 2·H·I) per token position fed, padding included) over their measured
time give the int8 rate the kernels reach: compare it with the CPU's int8 peak to see what
a faster engine could still win. The peer's export is made once with
``bench/int8_speed.py --export openvino`` in its own environment.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import nfcorpus_passages, stsb_test  # noqa: E402
from bench.int8_speed import cpu_description  # noqa: E402

PEER_XML = "/tmp/peers/minilm/openvino/openvino_model_qint8_quantized.xml"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers


def our_model(passages: list[str]) -> tuple[str, object]:
    """Path of our cached int8 model (built if missing, calibrated as int8_speed does) and
    the int8 encoder (its tokenizer and model config)."""
    from bge_core import Encoder
    from bge_core.int8 import OpenVINOBackbone

    left, right, _ = stsb_test()
    enc = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu", dtype="int8",
                                  calibration=(left + right)[:150] + passages[:150])
    enc.encode(passages[:2])  # builds (or loads) the model
    backbone = enc._int8  # noqa: SLF001 - the compiled model this profile is about
    if not isinstance(backbone, OpenVINOBackbone) or backbone.path is None:
        raise SystemExit("could not find the int8 encoder's OpenVINO model")
    return str(backbone.path), enc


def batches(tokenizer: object, passages: list[str], size: int
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted, padded (ids, mask) batches of `size` passages."""
    rows = tokenizer(passages, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    rows = sorted(rows, key=len)  # as sentence-transformers sorts before batching
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        ids = np.zeros((len(chunk), max(map(len, chunk))), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        out.append((ids, mask))
    return out


def profile(path: str, options: dict, feed: list, rounds: int) -> dict:
    """Best pass seconds and per-op-type profiled seconds (last pass) of one compiled model."""
    import openvino as ov

    from bge_core.int8 import denormals_flushed

    core = ov.Core()
    model = core.read_model(path)
    inputs = [p.get_any_name() for p in model.inputs]
    request = core.compile_model(model, "CPU", {**options, "PERF_COUNT": True}
                                 ).create_infer_request()

    def feeds(ids: np.ndarray, mask: np.ndarray) -> dict:
        named = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: named[name] for name in inputs}

    ops: collections.Counter = collections.Counter()
    kernels: dict = {}
    passes = []
    with denormals_flushed():
        request.infer(feeds(*feed[0]))  # warm-up
        for r in range(rounds):
            start = time.perf_counter()
            for ids, mask in feed:
                request.infer(feeds(ids, mask))
                if r == rounds - 1:
                    for info in request.profiling_info:
                        ops[info.node_type] += info.real_time.total_seconds()
                        kernels[info.node_type] = info.exec_type
            passes.append(time.perf_counter() - start)
    total = sum(ops.values())
    return {"inputs": inputs, "best_pass_s": min(passes), "passes_s": passes,
            "profiled_s": total,
            "ops": [{"op": op, "s": s, "share": s / total, "kernel": kernels[op]}
                    for op, s in ops.most_common() if s > 0.0005]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-xml", default=PEER_XML)
    parser.add_argument("--passages", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not Path(args.peer_xml).is_file():
        raise SystemExit(f"--peer-xml {args.peer_xml}: not found (export it with "
                         "bench/int8_speed.py --export openvino in the peer's environment)")
    from bge_core.int8 import compile_options

    passages = nfcorpus_passages(args.passages)
    ours, enc = our_model(passages)
    feed = batches(enc.tokenizer, passages, args.batch)
    fed = sum(ids.size for ids, _ in feed)
    real = sum(int(mask.sum()) for _, mask in feed)
    config = enc.backbone.config
    hidden, inner, layers = (config.hidden_size, config.intermediate_size,
                             config.num_hidden_layers)
    dense_macs = fed * layers * (4 * hidden * hidden + 2 * hidden * inner)
    ours_opts = compile_options(args.threads)
    engines = {"ours": (ours, ours_opts),
               "peer, our settings": (args.peer_xml, ours_opts),
               "peer, its settings": (args.peer_xml, {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": args.threads})}
    results: dict = {"cpu": cpu_description(), "passages": len(passages), "batch": args.batch,
                     "tokens_fed": fed, "real_tokens": real, "dense_gmac": dense_macs / 1e9,
                     "engines": {}}
    for name, (path, options) in engines.items():
        row = profile(path, options, feed, args.rounds)
        dense = sum(o["s"] for o in row["ops"] if o["op"].startswith("FullyConnected"))
        row["dense_s"] = dense
        row["dense_gmac_per_s_per_thread"] = dense_macs / 1e9 / dense / args.threads
        results["engines"][name] = row
        print(f"== {name}: best pass {row['best_pass_s']:.3f} s "
              f"({len(passages) / row['best_pass_s']:.1f} passages/s), inputs {row['inputs']}; "
              f"dense layers {dense:.3f} s = {row['dense_gmac_per_s_per_thread']:.0f} "
              "GMAC/s per thread")
        for op in row["ops"][:10]:
            print(f"   {op['op']:30s} {op['s']:7.3f} s {100 * op['share']:5.1f}%  {op['kernel']}")
    print(f"tokens fed {fed} (real {real}, padding {100 * (fed / real - 1):.1f}%), "
          f"dense layers {dense_macs / 1e9:.0f} GMAC a pass")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
