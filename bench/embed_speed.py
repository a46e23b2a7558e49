"""End-to-end rows/s of the Ray Data embedding job vs in-process encoding, and memory.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/embed_speed.py [--rows 20000] [--growth 5] \
        [--bf16-rows N | --skip-bf16] [--st-rows N | --skip-st] [--ray-cpus N] \
        [--cpus-per-actor N] [--json out.json]

Builds passages from NFCorpus text (64-word windows, cycled to --rows), writes them as
Parquet, then measures on the same texts and settings: the job (fp32 and bf16; wall time of
`run`, and of its encode stream from first read to last write); `Encoder.encode` in process
(in a separate Python process without Ray, once before and once after the fp32 job: a
shared host's speed drifts, and the ratio is taken against their mean); and
sentence-transformers fp32 `encode`. Peak RSS of the driver and of each encode actor is
sampled; the job is repeated on a corpus `--growth` times smaller to show memory does not
grow with the corpus. `--bf16-rows` runs the bf16 job on the first N rows only, `--st-rows`
times sentence-transformers on the first N (rows/s are rates and the passages are all
64-word windows; useful where bf16 is emulated and slow). The job runs at its defaults on
a local Ray with the machine's CPUs unless `--ray-cpus` / `--cpus-per-actor` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import nfcorpus_passages  # noqa: E402


def build_passages(rows: int, words: int = 64) -> list[str]:
    passages: list[str] = []
    docs = nfcorpus_passages()
    while len(passages) < rows:
        for doc in docs:
            tokens = doc.split()
            for i in range(0, len(tokens), words):
                passages.append(" ".join(tokens[i:i + words]))
                if len(passages) == rows:
                    return passages
    return passages


def write_parquet(passages: list[str], folder: Path, files: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(passages) // files)
    for f in range(files):
        chunk = passages[f * per:(f + 1) * per]
        ids = list(range(f * per, f * per + len(chunk)))
        pq.write_table(pa.table({"id": ids, "text": chunk}), folder / f"part-{f}.parquet")


class ActorMemory(threading.Thread):
    """Samples the RSS of every encode actor process once a second; keeps the peak per PID.

    Finds them by process title (Ray names actor processes after the actor class), so the
    sampling costs no calls to Ray's control plane.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(1.0):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "EncodeActor" not in " ".join(proc.info["cmdline"] or []):
                        continue
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)


def run_job(source: Path, out: Path, dtype: str, cpus_per_actor: float | None) -> dict:
    from pipelines.common.cli import make_config
    from pipelines.embed.main import EmbedConfig, run

    sampler = ActorMemory()
    sampler.start()
    start = time.perf_counter()
    manifest = run(make_config(EmbedConfig, input=str(source), output=str(out), dtype=dtype,
                               cpus_per_actor=cpus_per_actor, log_every_s=30))
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"rows": manifest["rows_written"], "wall_s": wall,
            "rows_s": manifest["rows_written"] / wall,
            "stage_s": manifest["seconds_this_attempt"],
            "actor_peak_rss_mib": [v / 2**20 for v in sampler.peaks.values()],
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_process_rows_s(rows: int) -> float:
    """`Encoder.encode` rows/s on the same passages, in a fresh process (so its memory does
    not count towards the job driver's peak RSS, measured in this process)."""
    proc = subprocess.run([sys.executable, __file__, "--rows", str(rows), "--in-process-only"],
                          capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["rows_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--growth", type=int, default=5)
    parser.add_argument("--bf16-rows", type=int, default=None)
    parser.add_argument("--st-rows", type=int, default=None)
    parser.add_argument("--skip-st", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: the machine's)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="the job's flag (default: the job's default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process_only:
        from bge_core import Encoder

        passages = build_passages(args.rows)
        encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu")
        start = time.perf_counter()
        encoder.encode(passages)
        print(json.dumps({"rows_s": args.rows / (time.perf_counter() - start)}))
        return
    import ray

    # Runs A-D (BENCHMARKS.md) used --ray-cpus 3 --cpus-per-actor 2: a 2-thread actor plus
    # the fractional tasks on 2 physical cores. Since the job's CPU default takes the cores
    # the tasks leave, it runs as it is on a plain local Ray.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
             log_to_driver=False)

    work = Path(tempfile.mkdtemp(prefix="embed_speed_"))
    passages = build_passages(args.rows)
    write_parquet(passages[: args.rows // args.growth], work / "small")
    write_parquet(passages, work / "full")
    bf16_rows = min(args.bf16_rows or args.rows, args.rows)
    write_parquet(passages[:bf16_rows], work / "bf16")
    results: dict = {"rows": args.rows, "cpu_count": os.cpu_count(),
                     "ray_cpus": args.ray_cpus, "cpus_per_actor": args.cpus_per_actor}
    results["in_process_fp32_rows_s_before"] = in_process_rows_s(args.rows)
    cpus = args.cpus_per_actor
    results["job_small_fp32"] = run_job(work / "small", work / "out_small", "fp32", cpus)
    results["job_fp32"] = run_job(work / "full", work / "out_fp32", "fp32", cpus)
    results["in_process_fp32_rows_s_after"] = in_process_rows_s(args.rows)
    results["in_process_fp32_rows_s"] = (results["in_process_fp32_rows_s_before"]
                                         + results["in_process_fp32_rows_s_after"]) / 2
    if not args.skip_bf16:
        results["job_bf16"] = run_job(work / "bf16", work / "out_bf16", "bf16", cpus)
    if not args.skip_st:
        from sentence_transformers import SentenceTransformer

        from bge_core.presets import offline_minilm_dir

        st = SentenceTransformer(str(offline_minilm_dir()), device="cpu")
        st_passages = passages[: args.st_rows or args.rows]
        st.encode(st_passages[:64], batch_size=32)  # warm-up
        start = time.perf_counter()
        st.encode(st_passages, batch_size=32)
        results["st_fp32_rows"] = len(st_passages)
        results["st_fp32_rows_s"] = len(st_passages) / (time.perf_counter() - start)
    for key in ("", "_before", "_after"):
        results[f"job_vs_in_process{key}"] = results["job_fp32"]["rows_s"] / results[
            f"in_process_fp32_rows_s{key}"]
    if "st_fp32_rows_s" in results and "job_bf16" in results:
        results["job_bf16_vs_st_fp32"] = results["job_bf16"]["rows_s"] / results[
            "st_fp32_rows_s"]
    small, full = results["job_small_fp32"], results["job_fp32"]
    results["driver_rss_growth"] = full["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    if small["actor_peak_rss_mib"] and full["actor_peak_rss_mib"]:
        results["actor_rss_growth"] = max(full["actor_peak_rss_mib"]) / max(
            small["actor_peak_rss_mib"])
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
