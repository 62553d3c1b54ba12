"""Time the int8 dense kernel against our fp32 kernel and onnxruntime (int8 and fp32).

Engines, all with 2 threads, interleaved in one process (``interleaved`` of
``kernels_matmul.py``: rounds rotate the engine order, a short pause and an
untimed call before each engine's block of calls; medians and 10th
percentiles):

* ``i8``: ours, ``quantize_rows`` (per-row dynamic uint8) + ``dense_int8``
  (per-channel int8 weights, dequantizing epilogue) - two parallel regions;
* ``i8k``: the ``dense_int8`` call alone (activations already quantized);
* ``f32``: ours, ``sparseinfer.kernels.dense.dense_packed``;
* ``ort8``: onnxruntime on a one-``MatMul`` float model quantized by
  ``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)``
  (DynamicQuantizeLinear + MatMulInteger, which onnxruntime's graph
  optimiser fuses), per-tensor weights as quantize_dynamic makes them by
  default (``--per-channel`` for per-channel);
* ``ort32``: onnxruntime on the float model.

Shapes: M in {128, 1024} x the BERT-base projections (K, N).  Also reported:
the largest difference between ours and onnxruntime's int8 result relative
to the output's magnitude (the two quantize the weights differently), and the
time of the first call of each kernel in this process (compilation, or
loading from Numba's cache when it is warm).

Usage::

    python benchmarks/kernels_int8.py [--rounds 7 --inner 10] [--per-channel]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_matmul import _session, interleaved, machine_load  # noqa: E402

from sparseinfer.kernels import dense as D  # noqa: E402
from sparseinfer.kernels import int8 as Q  # noqa: E402

SHAPES_KN = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
ENGINES = ("i8", "i8k", "f32", "ort8", "ort32")


def _matmul_model(M, K, N, W):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _quantized(model, per_channel):
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" warning
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
        return onnx.load(dst)


def first_calls():
    """Time of the first call of each kernel (compile, or load from a warm cache)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 70), dtype=np.float32)
    W = rng.standard_normal((70, 40), dtype=np.float32)
    xq = np.empty((9, Q.padded_k(70)), np.uint8)
    s, zp = np.empty(9, np.float32), np.empty(9, np.uint8)
    packed, sw, cs = Q.pack_weight_int8(W)
    bias, res = np.zeros(40, np.float32), np.zeros((9, 40), np.float32)
    times = {}
    for name, fn in (
        ("quantize_rows", lambda: Q.quantize_rows(x, xq, s, zp)),
        ("dense_int8", lambda: Q.dense_int8(xq, s, zp, packed, sw, cs)),
        ("dense_int8 bias+gelu+res", lambda: Q.dense_int8(xq, s, zp, packed, sw, cs, bias, res, act=D.ACT_GELU)),
        ("matmul_int8", lambda: Q.matmul_int8(xq, zp, packed, cs)),
    ):
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0
    return times


def bench(rounds, inner, per_channel):
    rng = np.random.default_rng(0)
    print(f"\n== Y = X @ W, {THREADS} threads, median ms over {rounds}x{inner} calls; {machine_load()}")
    print(f"int8 dot product instruction: {Q.DOT_INSTRUCTION}; onnxruntime weights per-channel: {per_channel}")
    hdr = " ".join(f"{e:>7}" for e in ENGINES)
    print(f"{'M':>5} {'K':>5} {'N':>5}     | {hdr} | {'f32/i8':>6} {'ort8/i8':>7} {'ort32/i8':>8} | {'i8 TOPS':>7} | rel.err")
    rows = []
    for M in (128, 1024):
        for K, N in SHAPES_KN:
            X = rng.standard_normal((M, K), dtype=np.float32)
            W = (rng.standard_normal((K, N), dtype=np.float32) * 0.05).astype(np.float32)
            Wp = D.pack_weight(W)
            packed, sw, cs = Q.pack_weight_int8(W)
            xq = np.empty((M, Q.padded_k(K)), np.uint8)
            xs, xzp = np.empty(M, np.float32), np.empty(M, np.uint8)
            out8, out32 = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
            model = _matmul_model(M, K, N, W)
            s8 = _session(_quantized(model, per_channel))
            s32 = _session(model)
            feeds = {"X": X}

            def ours_i8():
                Q.quantize_rows(X, xq, xs, xzp)
                Q.dense_int8_packed(xq, xs, xzp, packed, sw, cs, None, None, out8, D.ACT_NONE)

            ours_i8()
            fns = {
                "i8": ours_i8,
                "i8k": lambda: Q.dense_int8_packed(xq, xs, xzp, packed, sw, cs, None, None, out8, D.ACT_NONE),
                "f32": lambda: D.dense_packed(X, Wp, None, None, out32, D.ACT_NONE),
                "ort8": lambda: s8.run(None, feeds),
                "ort32": lambda: s32.run(None, feeds),
            }
            t, t10 = interleaved(fns, rounds, inner)
            ours_i8()
            (y8,) = s8.run(None, feeds)
            scale = float(np.abs(X.astype(np.float64) @ W).max())
            err = float(np.abs(out8 - y8).max()) / scale
            ops = 2.0 * M * K * N / 1e9
            for tag, tt in (("med", t), ("p10", t10)):
                cells = " ".join(f"{tt[e]:7.3f}" for e in ENGINES)
                print(
                    f"{M:5d} {K:5d} {N:5d} {tag} | {cells} | {tt['f32'] / tt['i8']:6.2f} "
                    f"{tt['ort8'] / tt['i8']:7.2f} {tt['ort32'] / tt['i8']:8.2f} | {ops / tt['i8']:7.2f}"
                    + (f" | {err:.1e}" if tag == "med" else "")
                )
            rows.append((M, K, N, t, t10))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--per-channel", action="store_true", help="per-channel weights for onnxruntime too")
    args = ap.parse_args()
    print("first call (compile or cache load), s:", {k: round(v, 2) for k, v in first_calls().items()})
    bench(args.rounds, args.inner, args.per_channel)


if __name__ == "__main__":
    main()
