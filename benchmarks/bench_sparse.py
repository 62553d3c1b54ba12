"""Pruned BERT-base: sparseinfer on pruned models against dense onnxruntime, same process.

    python benchmarks/bench_sparse.py                       # 50..97%, unstructured and 1x4 blocks
    python benchmarks/bench_sparse.py --sparsity 0.9 --structure unstructured 1x4 4x1

For each sparsity and structure the encoder's linear weights are magnitude-pruned with
`sparseinfer.prune` (random weights: the point is speed, not accuracy), sparseinfer runs the
pruned model, and onnxruntime runs the *dense* model, alternating in blocks (see bench_bert.py).
The figure to quote is the speedup = dense onnxruntime median / sparseinfer median. Writes
benchmarks/results/bert-sparse.{md,json} and a speedup-vs-sparsity plot (PNG, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_bert import PAUSE_S, RESULTS, _block, machine, make_feeds, stats  # noqa: E402
from bert_base import build_bert  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer import Engine  # noqa: E402


def parse_structure(text: str) -> tuple[int, int] | None:
    if text == "unstructured":
        return None
    r, c = (int(v) for v in text.lower().split("x"))
    return r, c


def run_one(model: onnx.ModelProto, session: ort.InferenceSession, feeds: dict, rounds: int, threads: int) -> dict:
    engine = Engine(model, num_threads=threads)
    t0 = time.perf_counter()
    ours = engine.run(feeds)
    first = time.perf_counter() - t0
    for _ in range(2):
        engine.run(feeds)
    t_ours, t_ort = [], []
    for _ in range(rounds):
        _block(lambda: engine.run(feeds), t_ours)
        _block(lambda: session.run(None, feeds), t_ort)
    layouts: dict[str, int] = {}
    for row in engine.describe():
        key = row["layout"] + (f" {row['block'][0]}x{row['block'][1]}" if row["block"] else "")
        layouts[key] = layouts.get(key, 0) + 1
    time.sleep(PAUSE_S)
    per_op: dict[str, float] = {}
    for row in engine.profile(feeds):
        per_op[row["op"]] = per_op.get(row["op"], 0.0) + row["ms"]
    s_ours, s_ort = stats(t_ours, feeds["input_ids"].shape[0]), stats(t_ort, feeds["input_ids"].shape[0])
    return {
        "sparseinfer": s_ours,
        "onnxruntime_dense": s_ort,
        "speedup": s_ort["median_ms"] / s_ours["median_ms"],
        "layouts": layouts,
        "per_op_ms": per_op,
        "first_run_s": first,
        "outputs": ours,
    }


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'sparseinfer[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for structure in dict.fromkeys(r["structure"] for r in report["results"]):
        rows = [r for r in report["results"] if r["structure"] == structure]
        ax.plot([100 * r["sparsity"] for r in rows], [r["speedup"] for r in rows], marker="o", label=structure)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="dense onnxruntime (break-even)")
    dense = report.get("dense_speedup")
    if dense:
        ax.axhline(dense, color="grey", linestyle=":", linewidth=1, label=f"dense sparseinfer ({dense:.2f}x)")
    ax.set_xlabel("encoder weight sparsity (%)")
    ax.set_ylabel("speedup over dense onnxruntime")
    ax.set_title(f"BERT-base, batch {report['batch']}, seq {report['sequence']}, {report['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Pruned BERT-base (batch {report['batch']}, seq {report['sequence']}, {report['threads']} threads) against dense onnxruntime",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; numba {m['numba']}, onnxruntime {m['onnxruntime']}. Same process, alternating blocks.",
        f"Dense sparseinfer on the unpruned model: {report['dense_speedup']:.2f}x dense onnxruntime.",
        "",
        "| structure | sparsity | sparseinfer median ms | onnxruntime (dense) median ms | speedup | layouts chosen |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        layouts = ", ".join(f"{k}: {v}" for k, v in r["layouts"].items())
        lines.append(
            f"| {r['structure']} | {100 * r['sparsity']:.0f}% | {r['sparseinfer']['median_ms']:.1f} | {r['onnxruntime_dense']['median_ms']:.1f} | {r['speedup']:.2f}x | {layouts} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.97])
    ap.add_argument("--structure", nargs="*", default=["unstructured", "1x4"], help="unstructured and/or RxC blocks")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    dense_model = build_bert(num_layers=args.layers)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(dense_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = make_feeds(args.batch, args.seq, 30522)

    dense = run_one(dense_model, session, feeds, args.rounds, args.threads)
    results = []
    for structure in args.structure:
        block = parse_structure(structure)
        for sp in args.sparsity:
            pruned = sparseinfer.prune(dense_model, sparsity=sp, block=block)
            r = run_one(pruned, session, feeds, args.rounds, args.threads)
            # the same pruned file through onnxruntime is the correctness oracle
            expected = ort.InferenceSession(pruned.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
            r["max_abs_diff_vs_onnxruntime_on_pruned"] = max(float(np.max(np.abs(a - b))) for a, b in zip(r.pop("outputs"), expected))
            r.update(structure=structure, sparsity=sp)
            results.append(r)
            print(
                f"{structure:>12s} {100 * sp:4.0f}%  {r['sparseinfer']['median_ms']:7.1f} ms  speedup {r['speedup']:.2f}x  {r['layouts']}",
                flush=True,
            )

    dense.pop("outputs")
    report = {
        "machine": machine(),
        "batch": args.batch,
        "sequence": args.seq,
        "threads": args.threads,
        "dense": dense,
        "dense_speedup": dense["speedup"],
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bert-sparse.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (RESULTS / "bert-sparse.md").write_text(md)
    plot(report, RESULTS / "bert-sparse.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
