"""Where sparse int8 beats dense int8: the 4 x 1-block sparse int8 kernel vs the dense int8 kernel.

For ``M`` (= batch * seq, default 128) and the four BERT-base projection
shapes (QKV 768x2304, attention output 768x768, FFN in 768x3072, FFN out
3072x768 - one encoder layer's matmuls), times one int8 Dense step as the
engine runs it, ``Y = dequant(quant(X) @ Wq)``:

* ``int8 dense``: ``quantize_rows`` + ``dense_int8_packed`` (two parallel
  regions; the baseline every ratio is taken against);
* ``int8 4x1``: :mod:`sparseinfer.kernels.int8_sparse` (quantization fused
  into its first parallel region) on W with a random mask of whole 4 x 1
  blocks (4 consecutive k of one output column): block density = density;
* ``int8 unstr``: the same kernel on W with a random unstructured mask of
  value density ``d``: the kernel's work is the fraction of 4 x 1 blocks
  holding a nonzero, ``1 - (1 - d)^4`` (reported as the block density).

Each sparse variant is timed against the dense int8 step back to back, in
rounds with a rotating order (``paired`` of ``sparse_breakeven.py``: the
speedup is the median over rounds of the ratio of the fastest calls of each
side of a pair).  The break-even *block* density is where the speedup curve
crosses 1 (linear interpolation), per shape and for the whole layer (the
four shapes summed); the layout pass (``passes/quantize.py``) keeps a
quantized weight sparse below it.

``--fp32`` adds a table at 10% density that also times the fp32 kernels on
the same weights: dense (``dense_packed``), CSR (unstructured mask) and
BSR 4x1 (block mask).  ``--variants lanes:kb,...`` times kernel variants
(register-tile lanes 16..128; K-panel height in rows, ``one`` for a single
panel or ``auto`` for the packer's choice) side by side, to choose the defaults.

Usage::

    python benchmarks/sparse_int8_breakeven.py [--rounds 7 --inner 3] [--m 128] [--threads 2]
        [--fp32] [--variants 128:one,128:256] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparseinfer  # noqa: E402, F401, I001  (before numba: it sets numba's compile target)
import numba  # noqa: E402
from sparse_breakeven import breakeven, machine_load, paired, wait_for_quiet  # noqa: E402

from sparseinfer.kernels import bsr as B  # noqa: E402
from sparseinfer.kernels import csr as C  # noqa: E402
from sparseinfer.kernels import dense as D  # noqa: E402
from sparseinfer.kernels import int8 as Q  # noqa: E402
from sparseinfer.kernels import int8_sparse as S  # noqa: E402
from sparseinfer.passes.quantize import block_density_4x1  # noqa: E402

SHAPES_KN = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
BLOCK_DENSITIES = [1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]
VALUE_DENSITIES = [0.3, 0.2, 0.1, 0.05, 0.02]  # unstructured: 4x1 block densities 0.76 .. 0.08


def masks(rng, K, N, structure, d):
    if structure == "4x1":
        return np.repeat(rng.random((-(-K // 4), N)) < d, 4, axis=0)[:K]
    return rng.random((K, N)) < d


def int8_step(X, W):
    """The dense int8 Dense step: quantize the rows, then the dense int8 kernel."""
    M, K = X.shape
    xq = np.empty((M, Q.padded_k(K)), np.uint8)
    xs = np.empty(M, np.float32)
    xz = np.empty(M, np.uint8)
    packed, ws, cs = Q.pack_weight_int8(W)
    out = np.empty((M, W.shape[1]), np.float32)

    def call():
        Q.quantize_rows(X, xq, xs, xz)
        Q.dense_int8_packed(xq, xs, xz, packed, ws, cs, None, None, out, D.ACT_NONE)

    return call, out


def sparse_int8_step(X, W, lanes=None, kb=None):
    M, K = X.shape
    ws = S.make_workspace(M, K, lanes)
    kernel = S.sparse_int8_kernel(M, ws["xt"].shape[2])
    (indptr, indices, data), w_scale, colsum = S.pack_weight_sparse_int8(W, kb)
    out = np.empty((M, W.shape[1]), np.float32)
    xq, xs, xz, xt, xsc, ot = (ws[k] for k in ("xq", "x_scale", "x_zp", "xt", "xs", "ot"))

    def call():
        kernel(
            X,
            indptr,
            indices,
            data,
            w_scale,
            colsum,
            None,
            None,
            out,
            D.ACT_NONE,
            xq,
            xs,
            xz,
            xt,
            xsc,
            ot,
            S.NO_CHAIN,
            S.NO_RANGE,
            S.CHAIN_NONE,
        )

    return call, out


def fp32_steps(X, W, fmt):
    M, K = X.shape
    N = W.shape[1]
    out = np.empty((M, N), np.float32)
    if fmt == "fp32 dense":
        Wp = D.pack_weight(W)
        return (lambda: D.dense_packed(X, Wp, None, None, out, D.ACT_NONE)), out
    if fmt == "fp32 csr":
        kernel, (xt, ot), packed = C.csr_kernel(M), C.make_workspace(M, K), C.pack_csr(W)
    else:
        kernel, (xt, ot), packed = B.bsr_kernel((4, 1), M), B.make_workspace(M, K, N, (4, 1)), B.pack_bsr(W, (4, 1))
    indptr, indices, data = packed
    return (lambda: kernel(X, indptr, indices, data, None, None, out, D.ACT_NONE, xt, ot)), out


def bench_shape(M, K, N, variants, rounds, inner, fp32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, K), dtype=np.float32)
    W0 = (rng.standard_normal((K, N), dtype=np.float32) * 0.05).astype(np.float32)
    dense, _ = int8_step(X, W0)
    fns, info, checks = {}, {}, []
    cases = [("4x1", d) for d in BLOCK_DENSITIES] + [("unstr", d) for d in VALUE_DENSITIES]
    if fp32:
        cases = [("4x1", 0.1), ("unstr", 0.1)]
    for structure, d in cases:
        mask = masks(rng, K, N, structure, d)
        W = W0 * mask
        ref_call, ref_out = int8_step(X, W)
        for v in variants:
            key = (f"int8 {structure}" + ("" if len(variants) == 1 else f" {v[0]}:{v[1]}"), d)
            fns[key], out = sparse_int8_step(X, W, *v)
            checks.append((fns[key], out, ref_call, ref_out))
            info[key] = block_density_4x1(mask)
        if fp32:
            for fmt in ("fp32 dense", "fp32 csr" if structure == "unstr" else "fp32 bsr 4x1"):
                fns[(fmt, d)], _ = fp32_steps(X, W, fmt)
                info[(fmt, d)] = block_density_4x1(mask)
    for call, out, ref_call, ref_out in checks:  # what is timed computes the dense int8 result, bit for bit
        call()
        ref_call()
        if not np.array_equal(out, ref_out):
            raise AssertionError(f"M={M} K={K} N={N}: sparse int8 result differs from the dense int8 kernel")
    return paired(dense, fns, rounds, inner), info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--m", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--fp32", action="store_true", help="the 10%% table with the fp32 kernels instead of the density sweep")
    ap.add_argument("--variants", default=None, help="lanes:kb,... kernel variants to compare (default: the module's defaults)")
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine before each shape")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    variants = [(None, None)]
    if a.variants:  # "auto": the packer's choice; "one": a single K panel
        names = {"None": None, "auto": None, "one": 1 << 30}
        variants = [tuple(names[x] if x in names else int(x) for x in v.split(":")) for v in a.variants.split(",")]
    if max(a.threads) > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads {max(a.threads)} > NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} (set BENCH_THREADS)")
    meta = {
        "numba": numba.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "dot_instruction": S.DOT_INSTRUCTION,
        "rounds": a.rounds,
        "inner": a.inner,
        "variants": [f"{v[0]}:{v[1]}" for v in variants],  # lanes (None: lanes_for(M)) : kb (None: auto)
        "load_before": machine_load(),
    }
    t0 = time.perf_counter()
    for M in a.m:  # compile (or load from the cache) outside the timings
        X = np.ones((M, 8), np.float32)
        W = np.ones((8, 8), np.float32)
        int8_step(X, W)[0]()
        for v in variants:
            sparse_int8_step(X, W, *v)[0]()
        if a.fp32:
            for fmt in ("fp32 dense", "fp32 csr", "fp32 bsr 4x1"):
                fp32_steps(X, W, fmt)[0]()
    meta["compile_or_cache_load_s"] = round(time.perf_counter() - t0, 2)
    meta["threading_layer"] = numba.threading_layer()
    print(
        f"numba {numba.__version__} ({meta['threading_layer']}), {S.DOT_INSTRUCTION}; ready in {meta['compile_or_cache_load_s']} s; {meta['load_before']}"
    )
    results = []
    for nth, M, (K, N) in [(nth, M, kn) for nth in a.threads for M in a.m for kn in SHAPES_KN]:
        numba.set_num_threads(nth)
        busy = wait_for_quiet(a.max_wait)
        t, info = bench_shape(M, K, N, variants, a.rounds, a.inner, a.fp32)
        dense = t.pop("dense")
        print(f"{nth} thr M={M} K={K} N={N}: int8 dense {dense['median_ms']:.3f} ms (others busy {100 * busy:.0f}%)", flush=True)
        for (fmt, d), s in t.items():
            print(f"    {fmt:24s} d={d:<5g} blocks={info[(fmt, d)]:.3f}  {s['median_ms']:.3f} ms  speedup {s['speedup']:.2f}", flush=True)
            results.append(
                {
                    "threads": nth,
                    "M": M,
                    "K": K,
                    "N": N,
                    "format": fmt,
                    "density": d,
                    "block_density": info[(fmt, d)],
                    "median_ms": s["median_ms"],
                    "p10_ms": s["p10_ms"],
                    "int8_dense_median_ms": dense["median_ms"],
                    "speedup": s["speedup"],
                    "others_busy_before": busy,
                }
            )
    meta["load_after"] = machine_load()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    doc = {"meta": meta, "results": results, "layer": layer_table(results)}
    name = "sparse_int8_fp32_at_10pct" if a.fp32 else "sparse_int8_breakeven"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = render_md(doc, a.fp32)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md)
    print()
    print(md)


def layer_table(results):
    """Per (threads, M, format, density): the four shapes summed, and the break-even block density."""
    out = []
    keys = sorted({(r["threads"], r["M"], r["format"]) for r in results})
    for nth, M, fmt in keys:
        rows = [r for r in results if (r["threads"], r["M"], r["format"]) == (nth, M, fmt)]
        pts = []
        for d in sorted({r["density"] for r in rows}, reverse=True):
            rs = [r for r in rows if r["density"] == d]
            dense_ms = sum(r["int8_dense_median_ms"] for r in rs)
            sparse_ms = sum(r["int8_dense_median_ms"] / r["speedup"] for r in rs)
            bd = float(np.mean([r["block_density"] for r in rs]))
            pts.append({"density": d, "block_density": bd, "sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms})
        be = {"layer": breakeven([(p["block_density"], p["speedup"]) for p in pts])}
        for K, N in SHAPES_KN:
            be[f"{K}x{N}"] = breakeven([(r["block_density"], r["speedup"]) for r in rows if (r["K"], r["N"]) == (K, N)])
        out.append({"threads": nth, "M": M, "format": fmt, "points": pts, "breakeven_block_density": be})
    return out


def _fmt_be(x):
    return "never" if x is None else ("always" if x >= 1.0 else f"{x:.2f}")


def render_md(doc, fp32):
    meta = doc["meta"]
    lines = [
        "# Sparse int8 (4x1 blocks) vs dense int8 on BERT-base shapes" + (": 10% density, with the fp32 kernels" if fp32 else ""),
        "",
        f"numba {meta['numba']} ({meta['threading_layer']}), {meta['dot_instruction']}; {meta['rounds']} rounds x {meta['inner']} calls, "
        f"interleaved. Machine load before / after: {meta['load_before']} / {meta['load_after']}.",
        "",
        "Speedup: median over rounds of (fastest dense int8 call / fastest call of the kernel), timed back to back; > 1: faster "
        "than dense int8 (quantize_rows + dense_int8_packed). Times are medians. `blocks`: fraction of nonzero 4x1 blocks "
        "(the sparse kernel's work). int8 4x1: random mask of whole 4x1 blocks; int8 unstr: random unstructured mask.",
        "",
    ]
    for lay in doc["layer"]:
        nth, M, fmt = lay["threads"], lay["M"], lay["format"]
        rows = [r for r in doc["results"] if (r["threads"], r["M"], r["format"]) == (nth, M, fmt)]
        be = lay["breakeven_block_density"]
        lines += [f"## {fmt}, {nth} thread{'s' if nth > 1 else ''}, M = {M}", ""]
        if not fp32 and fmt.startswith("int8"):
            lines.append(
                f"Break-even block density: layer {_fmt_be(be['layer'])}; "
                + ", ".join(f"{k} {_fmt_be(v)}" for k, v in be.items() if k != "layer")
            )
            lines.append("")
        lines.append(
            "| density | blocks | layer ms (int8 dense ms) | layer speedup | " + " | ".join(f"{K}x{N} ms (x)" for K, N in SHAPES_KN) + " |"
        )
        lines.append("|---:|---:|---:|---:|" + "---:|" * len(SHAPES_KN))
        for p in lay["points"]:
            cells = []
            for K, N in SHAPES_KN:
                r = next(r for r in rows if (r["K"], r["N"], r["density"]) == (K, N, p["density"]))
                cells.append(f"{r['median_ms']:.3f} ({r['speedup']:.2f})")
            lines.append(
                f"| {p['density']:g} | {p['block_density']:.2f} | {p['sparse_ms']:.3f} ({p['dense_ms']:.3f}) | {p['speedup']:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
