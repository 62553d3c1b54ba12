"""How much slower is a run that starts after the process was idle?

    python benchmarks/idle_wakeup.py                                  # 90% 1x4 fp32 and 90% 4x1 int8
    python benchmarks/idle_wakeup.py --runs 60 --pause 0.1
    OMP_WAIT_POLICY=ACTIVE python benchmarks/idle_wakeup.py           # workers spin instead of sleeping

BERT-base (batch 1, sequence 128, 2 threads) pruned with `sparseinfer.prune`; each model is run
`--runs` times back to back, then `--runs` times with a `--pause` sleep before every run, and the
percentiles of both are printed. The difference is what a request arriving at an idle engine pays:
OpenMP workers asleep after their spin time, cores clocked down or parked while idle. The
benchmark harness (bench_bert.py) pauses before each block of runs, so one run per block pays it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_bert import make_feeds  # noqa: E402
from bert_base import build_bert  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer import Engine  # noqa: E402

MODELS = {"90% 1x4 fp32": ((1, 4), None), "90% 4x1 int8": ((4, 1), "int8")}


def times(engine: Engine, feeds: dict, runs: int, pause: float) -> np.ndarray:
    out = []
    for _ in range(runs):
        if pause:
            time.sleep(pause)
        t = time.perf_counter()
        engine.run(feeds)
        out.append(time.perf_counter() - t)
    return 1e3 * np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--pause", type=float, default=0.1, help="seconds of idle before each run of the second series")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    dense = build_bert()
    feeds = make_feeds(1, 128, 30522)
    for name, (block, quantize) in MODELS.items():
        engine = Engine(sparseinfer.prune(dense, sparsity=0.9, block=block), num_threads=args.threads, quantize=quantize)
        for _ in range(5):
            engine.run(feeds)
        for label, pause in (("back to back", 0.0), (f"after {args.pause} s idle", args.pause)):
            t = times(engine, feeds, args.runs, pause)
            p10, p50, p90 = np.percentile(t, [10, 50, 90])
            print(f"{name:>14s}  {label:>18s}: p10 {p10:5.1f}  p50 {p50:5.1f}  p90 {p90:5.1f}  max {t.max():5.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
