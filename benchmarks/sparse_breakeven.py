"""Where sparse beats dense: CSR / BSR kernels vs the dense kernel on BERT-base matmuls.

For ``M`` (= batch * seq) in {128, 1024} and the four BERT-base projection
shapes (QKV 768x2304, attention output 768x768, FFN in 768x3072, FFN out
3072x768 - one encoder layer's matmuls), times ``Y = X @ W`` with

* ``dense``: ``sparseinfer.kernels.dense.dense_packed`` on the dense W;
* ``csr``: ``sparseinfer.kernels.csr`` on W with a random unstructured mask;
* ``bsr RxC``: ``sparseinfer.kernels.bsr`` on W with a random mask of whole
  R x C blocks (block density = value density)

at densities 1.0 .. 0.03.  Each sparse kernel is timed against the dense
one back to back (``--inner`` calls of each) in every one of ``--rounds``
rounds, the order of the kernels rotating between rounds; the speedup is
the median over rounds of (fastest dense call / fastest sparse call) of the
pair, so a burst of load from another process slows both sides of a pair
rather than one kernel.  Times are medians (and 10th percentiles) over all
calls.
``d=0`` (no nonzeros) is the fixed cost of a sparse call: transposing X in
and the result out, parallel regions.  Before each shape the script waits
(``--max-wait`` s) until other processes use less than a quarter of the CPUs
(the fraction is recorded with every result).

Break-even density: the density at which the speedup curve (linear
interpolation between the measured densities) crosses 1 - below it the
sparse kernel is faster.  Given per shape and for the whole layer (the four
shapes' times summed, sparse time = dense median / paired speedup).  The layout pass reads these from
``benchmarks/results/sparse_breakeven.json``.

Every table is measured for each thread count of ``--threads`` (default 2
and 1).  On the 2-vCPU machine the two vCPUs run FP work as two cores (a
register-only FMA loop: 7.4 zmm FMAs per ns on one thread, 14.6 on two), and
a parallel region waits for both: when other processes run, the 2-thread
numbers are hit by preemption much more than the 1-thread ones.  Check the
recorded load before trusting them.

Usage::

    python benchmarks/sparse_breakeven.py [--rounds 5 --inner 3] [--m 128 1024]
        [--blocks 1x4 4x1 1x8 4x4 8x1] [--threads 2 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # the most threads any table uses
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparseinfer  # noqa: E402, F401, I001  (before numba: it sets numba's compile target)
import numba  # noqa: E402

from sparseinfer.kernels import bsr as B  # noqa: E402
from sparseinfer.kernels import csr as C  # noqa: E402
from sparseinfer.kernels import dense as D  # noqa: E402

SHAPES_KN = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
DENSITIES = [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.0]


def machine_load() -> dict:
    """Load average and CPU pressure: other processes distort the timings."""
    info = {}
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = [float(x) for x in f.read().split()[:3]]
        with open("/proc/pressure/cpu") as f:
            info["cpu_pressure_some_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        pass
    return info


def others_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy during ``interval`` seconds while this process sleeps."""
    try:

        def busy_total():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            return sum(v) - v[3] - v[4], sum(v)

        b0, t0 = busy_total()
        time.sleep(interval)
        b1, t1 = busy_total()
        return (b1 - b0) / max(1, t1 - t0)
    except (OSError, ValueError):
        return 0.0


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` of the CPUs.

    Returns the last busy fraction seen.  On a 2-vCPU machine a parallel region
    waits for both threads, so one busy neighbour slows every call.
    """
    t0 = time.perf_counter()
    while True:
        busy = others_busy()
        if busy < threshold or time.perf_counter() - t0 > max_wait_s:
            return busy


def paired(dense, fns: dict, rounds: int, inner: int) -> dict:
    """Time each sparse callable against the dense one, back to back, in every round.

    A round runs, for every callable (in an order that rotates between
    rounds), ``inner`` dense calls and then ``inner`` sparse calls.  The
    speedup of a round is the ratio of the fastest call of each side (the
    call least disturbed by other processes: when the machine is shared, a
    call is slowed by whole scheduler time slices, so medians of calls of
    very different lengths are not comparable); the reported speedup is the
    median over rounds, so a burst of load slows both sides of the pairs it
    hits instead of one kernel.
    """
    names = list(fns)
    tdense = []
    times = {k: [] for k in names}
    ratios = {k: [] for k in names}
    dense()
    for f in fns.values():  # warm-up (compilation is cached; first touch of the buffers)
        f()
        f()

    def run(f):
        ts = []
        for _ in range(inner):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return ts

    for r in range(rounds):
        s = r % len(names)
        for k in names[s:] + names[:s]:
            td = run(dense)
            ts = run(fns[k])
            tdense += td
            times[k] += ts
            ratios[k].append(float(min(td) / min(ts)))
    out = {
        k: {
            "median_ms": float(np.median(v)) * 1e3,
            "p10_ms": float(np.percentile(v, 10)) * 1e3,
            "speedup": float(np.median(ratios[k])),
            "speedup_p10": float(np.percentile(tdense, 10) / np.percentile(v, 10)),
        }
        for k, v in times.items()
    }
    out["dense"] = {"median_ms": float(np.median(tdense)) * 1e3, "p10_ms": float(np.percentile(tdense, 10)) * 1e3}
    return out


def block_mask(rng, K, N, block, dens):
    r, c = block
    keep = rng.random((-(-K // r), -(-N // c))) < dens
    return np.kron(keep, np.ones((r, c), bool))[:K, :N]


def _sparse_call(kernel, X, packed, out, ws):
    indptr, indices, data = packed
    xt, ot = ws

    def call():
        kernel(X, indptr, indices, data, None, None, out, D.ACT_NONE, xt, ot)

    return call


def bench_shape(M, K, N, blocks, rounds, inner, seed=0):
    """One (M, K, N): every format x density, interleaved with the dense kernel."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, K), dtype=np.float32)
    W0 = (rng.standard_normal((K, N), dtype=np.float32) * 0.05).astype(np.float32)
    Wp = D.pack_weight(W0)
    out_d = np.empty((M, N), np.float32)

    def dense():
        D.dense_packed(X, Wp, None, None, out_d, D.ACT_NONE)

    fns = {}
    checks = []
    for fmt in ["csr"] + [f"bsr {r}x{c}" for r, c in blocks]:
        if fmt == "csr":
            kernel, ws = C.csr_kernel(M), C.make_workspace(M, K, N)
        else:
            block = blocks[[f"bsr {r}x{c}" for r, c in blocks].index(fmt)]
            kernel, ws = B.bsr_kernel(block, M), B.make_workspace(M, K, N, block)
        for d in DENSITIES:
            if fmt == "csr":
                W = W0 * (rng.random((K, N)) < d)
                packed = C.pack_csr(W)
            else:
                W = W0 * block_mask(rng, K, N, block, d)
                packed = B.pack_bsr(W, block)
            out = np.empty((M, N), np.float32)
            fns[(fmt, d)] = _sparse_call(kernel, X, packed, out, ws)
            checks.append((fns[(fmt, d)], out, W))
    for call, out, W in checks:  # correctness of what is timed
        call()
        err = float(np.abs(out - X @ W).max())
        if err > 1e-3:
            raise AssertionError(f"M={M} K={K} N={N}: sparse result differs from X @ W by {err}")
    return paired(dense, fns, rounds, inner)


def breakeven(dens_speed: list[tuple[float, float]]) -> float | None:
    """Density where the interpolated speedup curve crosses 1 coming from low densities.

    ``dens_speed``: (density, speedup) pairs.  Returns the highest density below
    which every measured point is >= 1 (interpolated between the last winning and
    the first losing point), 1.0 if sparse always wins, None if it never wins.
    """
    pts = sorted((d, s) for d, s in dens_speed if d > 0)
    if not pts or pts[0][1] < 1.0:
        return None
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s1 < 1.0:
            return float(d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1))
    return 1.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--m", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--blocks", nargs="+", default=["1x4", "4x1", "1x8", "4x4", "8x1"])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine before each shape")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    blocks = [tuple(int(x) for x in b.split("x")) for b in a.blocks]
    for b in blocks:
        B.check_block(b)
    formats = ["csr"] + [f"bsr {r}x{c}" for r, c in blocks]
    if max(a.threads) > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads {max(a.threads)} > NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} (set BENCH_THREADS)")
    meta = {
        "numba": numba.__version__,
        "numpy": np.__version__,
        "threads": a.threads,
        "threading_layer": None,
        "cpu": platform.processor() or platform.machine(),
        "rounds": a.rounds,
        "inner": a.inner,
        "load_before": machine_load(),
    }
    t0 = time.perf_counter()
    # compile (or load from the on-disk cache) every kernel used, outside the timings
    for M in a.m:
        X = np.ones((M, 8), np.float32)
        W = np.ones((8, 8), np.float32)
        C.csr_matmul(X, C.pack_csr(W), 8)
        for b in blocks:
            B.bsr_matmul(X, B.pack_bsr(W, b), 8)
    D.dense_packed(np.ones((16, 8), np.float32), D.pack_weight(np.ones((8, 8), np.float32)), None, None, np.empty((16, 8), np.float32), 0)
    meta["compile_or_cache_load_s"] = round(time.perf_counter() - t0, 2)
    meta["threading_layer"] = numba.threading_layer()
    print(
        f"numba {numba.__version__}, {meta['threads']} threads ({meta['threading_layer']}); "
        f"kernels ready in {meta['compile_or_cache_load_s']} s; machine: {meta['load_before']}",
        flush=True,
    )
    results = []
    for M, nth, K, N in [(M, nth, K, N) for nth in a.threads for M in a.m for K, N in SHAPES_KN]:
        numba.set_num_threads(nth)
        busy = wait_for_quiet(a.max_wait)
        t = bench_shape(M, K, N, blocks, a.rounds, a.inner)
        dense = t["dense"]
        line = [f"{nth} thr M={M:5d} K={K:5d} N={N:5d} dense {dense['median_ms']:8.3f} ms (others busy {100 * busy:.0f}%) | speedup at d ="]
        line.append("  ".join(f"{d:g}" for d in DENSITIES))
        print(" ".join(line), flush=True)
        for fmt in formats:
            row = []
            for d in DENSITIES:
                s = t[(fmt, d)]
                sp = s["speedup"]
                row.append(sp)
                results.append(
                    {
                        "threads": nth,
                        "M": M,
                        "K": K,
                        "N": N,
                        "format": fmt,
                        "density": d,
                        "median_ms": s["median_ms"],
                        "p10_ms": s["p10_ms"],
                        "dense_median_ms": dense["median_ms"],
                        "dense_p10_ms": dense["p10_ms"],
                        "speedup": sp,
                        "speedup_p10": s["speedup_p10"],
                        "others_busy_before": busy,
                    }
                )
            print(f"    {fmt:10s} " + " ".join(f"{x:6.2f}" for x in row), flush=True)
    meta["load_after"] = machine_load()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)

    # the whole layer: sum of the four shapes' medians
    layer = []
    be = []
    for nth, M in [(nth, M) for nth in a.threads for M in a.m]:
        rows = [r for r in results if r["M"] == M and r["threads"] == nth]
        dense_sum = sum({(r["K"], r["N"]): r["dense_median_ms"] for r in rows}.values())
        for fmt in formats:
            pts = []
            for d in DENSITIES:
                s = sum(r["dense_median_ms"] / r["speedup"] for r in rows if r["format"] == fmt and r["density"] == d)
                pts.append((d, dense_sum / s))
                layer.append(
                    {"threads": nth, "M": M, "format": fmt, "density": d, "sparse_ms": s, "dense_ms": dense_sum, "speedup": dense_sum / s}
                )
            be.append({"threads": nth, "M": M, "K": None, "N": None, "format": fmt, "breakeven_density": breakeven(pts)})
            for K, N in SHAPES_KN:
                p = [(r["density"], r["speedup"]) for r in rows if r["format"] == fmt and (r["K"], r["N"]) == (K, N)]
                be.append({"threads": nth, "M": M, "K": K, "N": N, "format": fmt, "breakeven_density": breakeven(p)})
    os.makedirs(a.out, exist_ok=True)
    doc = {"meta": meta, "densities": DENSITIES, "results": results, "layer": layer, "breakeven": be}
    with open(os.path.join(a.out, "sparse_breakeven.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = render_md(doc, formats, a.m, a.threads)
    with open(os.path.join(a.out, "sparse_breakeven.md"), "w") as f:
        f.write(md)
    print()
    print(md)


def _fmt_be(x):
    return "never" if x is None else ("always" if x >= 1.0 else f"{x:.2f}")


def render_md(doc, formats, Ms, threads):
    meta = doc["meta"]
    dens = [d for d in doc["densities"] if d > 0]
    out = [
        "# Sparse vs dense matmul kernels on BERT-base shapes",
        "",
        f"numba {meta['numba']} ({meta['threading_layer']}); {meta['rounds']} rounds x {meta['inner']} calls per kernel, "
        f"interleaved; medians. Machine load before / after: {meta['load_before']} / {meta['load_after']}.",
        "",
        "Speedup: median over rounds of (fastest of the round's dense calls / fastest of its sparse calls), "
        "timed back to back; > 1 means sparse is faster. "
        "CSR: random unstructured mask; BSR RxC: random mask of whole blocks (block density = density). "
        "Layer: the four shapes summed. `d=0 ms`: the fixed cost of a sparse call (transposes in and out, parallel regions). "
        "Break-even density: below it the sparse kernel is faster (interpolated).",
        "",
    ]
    for nth, M in [(nth, M) for nth in threads for M in Ms]:
        lay = [r for r in doc["layer"] if r["M"] == M and r["threads"] == nth]
        res = [r for r in doc["results"] if r["M"] == M and r["threads"] == nth]
        dense_ms = lay[0]["dense_ms"]
        out += [
            f"## {nth} thread{'s' if nth > 1 else ''}, M = {M}: one encoder layer (the four shapes summed; dense {dense_ms:.2f} ms)",
            "",
        ]
        out.append("| format | " + " | ".join(f"d={d:g}" for d in dens) + " | d=0 ms | break-even density |")
        out.append("|---|" + "---:|" * (len(dens) + 2))
        for fmt in formats:
            sp = {r["density"]: r for r in lay if r["format"] == fmt}
            b = next(x for x in doc["breakeven"] if (x["threads"], x["M"], x["K"], x["format"]) == (nth, M, None, fmt))
            out.append(
                f"| {fmt} | "
                + " | ".join(f"{sp[d]['speedup']:.2f}" for d in dens)
                + f" | {sp[0.0]['sparse_ms']:.3f} | {_fmt_be(b['breakeven_density'])} |"
            )
        out += ["", f"Per shape ({nth} thread{'s' if nth > 1 else ''}, M = {M}): speedup at d=0.1; break-even density", ""]
        out.append("| format | " + " | ".join(f"{K}x{N}" for K, N in SHAPES_KN) + " |")
        out.append("|---|" + "---:|" * len(SHAPES_KN))
        cells = []
        for K, N in SHAPES_KN:
            r = next(r for r in res if (r["K"], r["N"]) == (K, N))
            cells.append(f"{r['dense_median_ms']:.3f} ms")
        out.append("| dense | " + " | ".join(cells) + " |")
        for fmt in formats:
            cells = []
            for K, N in SHAPES_KN:
                r = next(r for r in res if (r["K"], r["N"], r["format"], r["density"]) == (K, N, fmt, 0.1))
                b = next(x for x in doc["breakeven"] if (x["threads"], x["M"], x["K"], x["N"], x["format"]) == (nth, M, K, N, fmt))
                cells.append(f"{r['speedup']:.2f}x; {_fmt_be(b['breakeven_density'])}")
            out.append(f"| {fmt} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
