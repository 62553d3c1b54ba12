"""Dense fp32 BERT-base: sparseinfer against onnxruntime, in one process, alternating.

    python benchmarks/bench_bert.py                 # batch 1 and 8, sequence 128
    python benchmarks/bench_bert.py --batch 1 --rounds 30 --layers 12

Each round times a block of sparseinfer runs and a block of onnxruntime runs, so machine noise
hits both alike; the ratio of medians is the figure to quote (absolute times drift ±30% here).
Before each block the harness pauses briefly: both runtimes leave their worker threads
spin-waiting after a run, and without the pause one engine's spinning threads take the cores
from the other's first runs (measured here: it inflated batch-1 times by a third).
Both use the same number of threads. Start-up is measured in fresh processes: the first result
with an empty Numba cache (cold) and with the cache filled by the previous process (warm).
Writes benchmarks/results/bert-dense.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bert_base import build_bert  # noqa: E402

from sparseinfer import Engine  # noqa: E402

RESULTS = HERE / "results"


def make_feeds(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    for i in range(1, batch):  # some padding, as real batches have
        mask[i, seq - (i * seq) // (2 * batch) :] = 0
    return {
        "input_ids": rng.integers(1000, vocab, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def stats(times: list[float], batch: int) -> dict:
    ms = sorted(1e3 * t for t in times)
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "items_per_s": batch / (statistics.median(ms) / 1e3),
        "runs": len(ms),
    }


PAUSE_S = 0.1  # longer than either runtime's spin-wait after a run
BLOCK = 3  # runs per block
PROFILE_RUNS = 10


def _block(fn, times: list[float]) -> None:
    time.sleep(PAUSE_S)
    for _ in range(BLOCK):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)


def bench_shape(engine: Engine, session: ort.InferenceSession, batch: int, seq: int, vocab: int, rounds: int, warmup: int) -> dict:
    feeds = make_feeds(batch, seq, vocab)
    t0 = time.perf_counter()
    ours = engine.run(feeds)  # compiles the plan for this shape (and JIT-compiles kernels if needed)
    first = time.perf_counter() - t0
    theirs = session.run(None, feeds)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
    for _ in range(warmup):
        engine.run(feeds)
        session.run(None, feeds)
    t_ours, t_ort = [], []
    for _ in range(rounds):
        _block(lambda: engine.run(feeds), t_ours)
        _block(lambda: session.run(None, feeds), t_ort)
    time.sleep(PAUSE_S)
    per_run: list[dict[str, float]] = []
    for _ in range(PROFILE_RUNS):  # a median over several runs: one descheduled thread ruins a mean of three
        totals: dict[str, float] = {}
        for row in engine.profile(feeds):
            key = f"{row['op']} ({row['kind']})"
            totals[key] = totals.get(key, 0.0) + row["ms"]
        per_run.append(totals)
    ops = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in per_run[0]}
    s_ours, s_ort = stats(t_ours, batch), stats(t_ort, batch)
    return {
        "batch": batch,
        "sequence": seq,
        "sparseinfer": s_ours,
        "onnxruntime": s_ort,
        "ratio": s_ours["median_ms"] / s_ort["median_ms"],
        "first_run_s": first,
        "max_abs_diff": err,
        "per_op_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "peak_activation_bytes": engine.plan(feeds).buffers.peak_bytes,
    }


_STARTUP = """
import time, sys
t0 = time.perf_counter()
import numpy as np
from sparseinfer import Engine
e = Engine(sys.argv[1])
b, s = int(sys.argv[2]), int(sys.argv[3])
feeds = {"input_ids": np.ones((b, s), np.int64), "attention_mask": np.ones((b, s), np.int64), "token_type_ids": np.zeros((b, s), np.int64)}
e.run(feeds)
print(time.perf_counter() - t0)
"""


def startup(model_path: Path, batch: int, seq: int) -> dict:
    """Seconds from interpreter start-up work to the first result, cold and warm Numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(
            subprocess.run(
                [sys.executable, "-c", _STARTUP, str(model_path), str(batch), str(seq)], env=env, check=True, capture_output=True, text=True
            ).stdout.strip()
        )  # noqa: E731
        cold = run()
        warm = run()
    return {"cold_s": cold, "warm_s": warm}


def machine() -> dict:
    import numba

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numba": numba.__version__,
        "onnxruntime": ort.__version__,
    }


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Dense fp32 BERT-base ({report['config']['layers']} layers, hidden {report['config']['hidden']}): sparseinfer vs onnxruntime",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; threads: {report['threads']}; numba {m['numba']}, onnxruntime {m['onnxruntime']}.",
        f"Same process, alternating blocks of {BLOCK} runs with a {PAUSE_S}s pause before each, {report['rounds']} rounds per shape. "
        "Ratio = sparseinfer median / onnxruntime median (lower is better).",
        "",
        "| batch | seq | sparseinfer median ms | onnxruntime median ms | ratio | sparseinfer items/s | onnxruntime items/s | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["shapes"]:
        a, b = r["sparseinfer"], r["onnxruntime"]
        lines.append(
            f"| {r['batch']} | {r['sequence']} | {a['median_ms']:.1f} | {b['median_ms']:.1f} | {r['ratio']:.2f} | {a['items_per_s']:.2f} | {b['items_per_s']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    lines += ["", "Where sparseinfer's time goes (ms per run, from `Engine.profile`):", ""]
    for r in report["shapes"]:
        lines.append(f"- batch {r['batch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in list(r["per_op_ms"].items())[:6]))
        lines.append(
            f"  peak activation memory {r['peak_activation_bytes'] / 2**20:.1f} MiB; first run (plan compile) {r['first_run_s']:.2f} s"
        )
    if "startup" in report:
        s = report["startup"]
        lines += [
            "",
            f"Start-up to first result (fresh process, batch 1): cold Numba cache {s['cold_s']:.1f} s, warm cache {s['warm_s']:.1f} s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up measurement")
    args = ap.parse_args()

    heads, ffn = args.hidden // 64, 4 * args.hidden
    model = build_bert(num_layers=args.layers, hidden=args.hidden, heads=heads, ffn=ffn)
    RESULTS.mkdir(exist_ok=True)
    model_path = RESULTS / f"bert-{args.layers}x{args.hidden}.onnx"
    onnx.save(model, str(model_path))

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    engine = Engine(model_path, num_threads=args.threads)
    load_s = time.perf_counter() - t0

    report = {
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "config": {"layers": args.layers, "hidden": args.hidden, "heads": heads, "ffn": ffn},
        "engine_load_s": load_s,
        "shapes": [bench_shape(engine, session, b, args.seq, 30522, args.rounds, args.warmup) for b in args.batch],
    }
    if not args.no_startup:
        report["startup"] = startup(model_path, 1, args.seq)
    (RESULTS / "bert-dense.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (RESULTS / "bert-dense.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
