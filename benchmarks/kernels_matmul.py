"""Time the dense kernels against NumPy (OpenBLAS) and onnxruntime.

Everything runs in one process with 2 threads for every engine (Numba
``prange`` threads, OpenBLAS threads, onnxruntime intra-op threads).  The
engines are interleaved: each round runs every engine ``--inner`` times back
to back after a short sleep and one untimed call (so the previous engine's
spin-waiting threads are asleep and this engine's pool is warm),
the order of engines rotates between rounds, and the reported numbers are the
median and the 10th percentile over all calls (the latter is less sensitive to
other processes: a Numba parallel region waits for both threads, so one
preempted thread costs a whole scheduler slice).

Part 1: ``Y = X @ W`` for M in {128, 1024} and the BERT-base projection
shapes; ours is ``sparseinfer.kernels.dense.dense_packed`` (W pre-packed),
NumPy is ``np.matmul(X, W, out=out)`` called from Python, onnxruntime is a
one-node ``MatMul`` model with W as an initializer.

Part 2 (``--layer``): one BERT-base encoder layer (the graph of
``benchmarks/bert_base.py``, hidden states and additive mask as inputs)
in onnxruntime (default graph optimisations, which fuse LayerNorm / GELU)
vs the same layer composed of our kernels (4 dense calls with fused
bias / GELU / residual epilogues, fused attention, 2 layernorms).

Usage::

    python benchmarks/kernels_matmul.py [--rounds 7 --inner 10] [--layer] [--no-matmul]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparseinfer  # noqa: E402, F401, I001  (before numba: it sets numba's compile target)
import numba  # noqa: E402

from sparseinfer.kernels import dense as D  # noqa: E402
from sparseinfer.kernels.attention import attention_packed, make_workspace  # noqa: E402
from sparseinfer.kernels.norm import layernorm_packed  # noqa: E402

SHAPES_KN = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def machine_load():
    """Load average and CPU pressure (other processes distort the timings)."""
    parts = []
    try:
        with open("/proc/loadavg") as f:
            parts.append("loadavg " + " ".join(f.read().split()[:3]))
        with open("/proc/pressure/cpu") as f:
            parts.append("cpu pressure " + f.readline().split()[1])
    except OSError:
        pass
    return "; ".join(parts)


def interleaved(fns, rounds, inner):
    """Run each callable ``inner`` times per round, rotating the order."""
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
        f()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            f = fns[k]
            # let the previous engine's spinning worker threads (GOMP, onnxruntime)
            # go to sleep so that they do not steal CPU from this engine
            time.sleep(0.03)
            f()
            for _ in range(inner):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    p10 = {k: float(np.percentile(v, 10)) * 1e3 for k, v in times.items()}
    return med, p10


def bench_matmul(rounds, inner):
    rng = np.random.default_rng(0)
    print(f"\n== Y = X @ W, {THREADS} threads, median ms over {rounds}x{inner} calls")
    print(
        f"{'M':>5} {'K':>5} {'N':>5}     | {'ours':>8} {'numpy':>8} {'ort':>8} | "
        f"{'ours/ort':>8} {'np/ort':>8} | {'ours GF/s':>9} {'ort GF/s':>8}"
    )
    rows = []
    for M in (128, 1024):
        for K, N in SHAPES_KN:
            X = rng.standard_normal((M, K), dtype=np.float32)
            W = (rng.standard_normal((K, N), dtype=np.float32) * 0.05).astype(np.float32)
            Wp = D.pack_weight(W)
            out = np.empty((M, N), np.float32)
            out2 = np.empty((M, N), np.float32)
            g = helper.make_graph(
                [helper.make_node("MatMul", ["X", "W"], ["Y"])],
                "mm",
                [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
                [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
                [numpy_helper.from_array(W, "W")],
            )
            sess = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
            feeds = {"X": X}
            fns = {
                "ours": lambda: D.dense_packed(X, Wp, None, None, out, D.ACT_NONE),
                "numpy": lambda: np.matmul(X, W, out=out2),
                "ort": lambda: sess.run(None, feeds),
            }
            t, t10 = interleaved(fns, rounds, inner)
            (y,) = sess.run(None, feeds)
            err = float(np.abs(out - y).max())
            gf = 2.0 * M * K * N / 1e6
            for tag, tt in (("med", t), ("p10", t10)):
                print(
                    f"{M:5d} {K:5d} {N:5d} {tag} | {tt['ours']:8.3f} {tt['numpy']:8.3f} "
                    f"{tt['ort']:8.3f} | {tt['ours'] / tt['ort']:8.2f} "
                    f"{tt['numpy'] / tt['ort']:8.2f} | {gf / tt['ours']:9.0f} "
                    f"{gf / tt['ort']:8.0f}" + (f"   (max|ours-ort| {err:.1e})" if tag == "med" else "")
                )
            rows.append((M, K, N, t, t10))
    return rows


def _layer_model(B, S, hidden, heads, ffn, seed=0):
    from bert_base import _G, _layer

    g = _G(np.random.default_rng(seed))
    inputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", hidden]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "sequence"]),
    ]
    out = _layer(g, "hidden", "mask", 0, hidden, heads, ffn, 17, "sdpa")
    g.nodes.append(helper.make_node("Identity", [out], ["out"], name="out"))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", hidden])]
    graph = helper.make_graph(g.nodes, "layer", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _layer_params(model):
    """Pull weights out of the one-layer graph (initializer order of _layer)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mms = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    Wq, Wk, Wv, Wo, W1, W2 = (inits[n.input[1]] for n in mms)
    p = "bert.encoder.layer.0."
    b = lambda n: inits[p + n]  # noqa: E731
    return dict(
        Wqkv=D.pack_weight(np.concatenate([Wq, Wk, Wv], axis=1)),
        bqkv=np.concatenate([b("attention.self.query.bias"), b("attention.self.key.bias"), b("attention.self.value.bias")]),
        Wo=D.pack_weight(Wo),
        bo=b("attention.output.dense.bias"),
        g1=b("attention.output.LayerNorm.weight"),
        be1=b("attention.output.LayerNorm.bias"),
        W1=D.pack_weight(W1),
        b1=b("intermediate.dense.bias"),
        W2=D.pack_weight(W2),
        b2=b("output.dense.bias"),
        g2=b("output.LayerNorm.weight"),
        be2=b("output.LayerNorm.bias"),
    )


class OurLayer:
    def __init__(self, P, B, S, hidden, heads, ffn):
        self.P, self.B, self.S, self.H, self.D = P, B, S, heads, hidden // heads
        M = B * S
        self.qkv = np.empty((M, 3 * hidden), np.float32)
        self.ctx = np.empty((M, hidden), np.float32)
        self.a = np.empty((M, hidden), np.float32)
        self.f = np.empty((M, ffn), np.float32)
        self.o = np.empty((M, hidden), np.float32)
        self.ws = make_workspace(S, self.D)
        self.nth = max(1, min(numba.get_num_threads(), B * heads))
        self.scale = np.float32(1.0 / np.sqrt(self.D))
        self.eps = np.float32(1e-12)

    def __call__(self, h, mask2d):
        P, hd = self.P, self.H * self.D
        D.dense_packed(h, P["Wqkv"], P["bqkv"], None, self.qkv, D.ACT_NONE)
        attention_packed(
            self.qkv, self.qkv, self.qkv, 0, hd, 2 * hd, mask2d, self.B, self.S, self.H, self.D, self.scale, self.ctx, *self.ws, self.nth
        )
        D.dense_packed(self.ctx, P["Wo"], P["bo"], h, self.a, D.ACT_NONE)
        layernorm_packed(self.a, None, P["g1"], P["be1"], self.eps, self.a)
        D.dense_packed(self.a, P["W1"], P["b1"], None, self.f, D.ACT_GELU)
        D.dense_packed(self.f, P["W2"], P["b2"], self.a, self.o, D.ACT_NONE)
        layernorm_packed(self.o, None, P["g2"], P["be2"], self.eps, self.o)
        return self.o


def bench_layer(rounds, inner, hidden=768, heads=12, ffn=3072):
    print(f"\n== one BERT encoder layer (hidden {hidden}, heads {heads}, ffn {ffn}), {THREADS} threads, median ms")
    model = _layer_model(1, 1, hidden, heads, ffn)
    P = _layer_params(model)
    sess = _session(model)
    for B, S in ((1, 128), (8, 128)):
        rng = np.random.default_rng(1)
        h = rng.standard_normal((B * S, hidden), dtype=np.float32)
        m2 = np.zeros((B, S), np.float32)
        for b in range(B):
            m2[b, S - 13 * b :] = np.finfo(np.float32).min if b else 0.0
        feeds = {"hidden": h.reshape(B, S, hidden), "mask": m2.reshape(B, 1, 1, S)}
        layer = OurLayer(P, B, S, hidden, heads, ffn)
        t, t10 = interleaved({"ours": lambda: layer(h, m2), "ort": lambda: sess.run(None, feeds)}, rounds, inner)
        (y,) = sess.run(None, feeds)
        err = float(np.abs(layer(h, m2) - y.reshape(B * S, hidden)).max())
        for tag, tt in (("med", t), ("p10", t10)):
            print(
                f"B={B} S={S} {tag}: ours {tt['ours']:.3f} ms  ort {tt['ort']:.3f} ms  "
                f"ours/ort {tt['ours'] / tt['ort']:.3f}  (x12 layers: "
                f"{12 * tt['ours']:.1f} vs {12 * tt['ort']:.1f} ms)"
            )
        print(f"    max|ours-ort| {err:.1e}")


class OurBert:
    """Full BertForSequenceClassification forward composed of our kernels.

    Weights are read from the ONNX model of :func:`bert_base.build_bert`
    (opset 17, either attention pattern); the graph itself is not
    interpreted - this is the hand-written schedule a graph compiler should
    reach (QKV fused into one matmul, bias / GELU / residual fused into the
    matmul epilogues, fused attention, in-place layernorm)."""

    def __init__(self, model, num_layers, hidden, heads, ffn):
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        mms = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        self.word = inits["bert.embeddings.word_embeddings.weight"]
        self.pos = inits["bert.embeddings.position_embeddings.weight"]
        self.tt = inits["bert.embeddings.token_type_embeddings.weight"]
        self.eg = inits["bert.embeddings.LayerNorm.weight"]
        self.eb = inits["bert.embeddings.LayerNorm.bias"]
        self.layers = []
        for i in range(num_layers):
            Wq, Wk, Wv, Wo, W1, W2 = (inits[n] for n in mms[6 * i : 6 * i + 6])
            b = lambda n: inits[f"bert.encoder.layer.{i}.{n}"]  # noqa: E731
            self.layers.append(
                dict(
                    Wqkv=D.pack_weight(np.concatenate([Wq, Wk, Wv], axis=1)),
                    bqkv=np.concatenate([b("attention.self.query.bias"), b("attention.self.key.bias"), b("attention.self.value.bias")]),
                    Wo=D.pack_weight(Wo),
                    bo=b("attention.output.dense.bias"),
                    g1=b("attention.output.LayerNorm.weight"),
                    be1=b("attention.output.LayerNorm.bias"),
                    W1=D.pack_weight(W1),
                    b1=b("intermediate.dense.bias"),
                    W2=D.pack_weight(W2),
                    b2=b("output.dense.bias"),
                    g2=b("output.LayerNorm.weight"),
                    be2=b("output.LayerNorm.bias"),
                )
            )
        self.pw = D.pack_weight(inits["bert.pooler.dense.weight"].T)
        self.pb = inits["bert.pooler.dense.bias"]
        self.cw = D.pack_weight(inits["classifier.weight"].T)
        self.cb = inits["classifier.bias"]
        self.hidden, self.heads, self.ffn = hidden, heads, ffn
        self.shape = None

    def _alloc(self, B, S):
        self.shape = (B, S)
        self.runners = [OurLayer(P, B, S, self.hidden, self.heads, self.ffn) for P in self.layers[:1]]
        self.h = np.empty((B * S, self.hidden), np.float32)
        self.tmp = np.empty((B * S, self.hidden), np.float32)
        self.mask = np.empty((B, S), np.float32)
        self.cls = np.empty((B, self.hidden), np.float32)
        self.pooled = np.empty((B, self.hidden), np.float32)
        self.logits = np.empty((B, self.cb.shape[0]), np.float32)

    def __call__(self, input_ids, attention_mask, token_type_ids):
        B, S = input_ids.shape
        if self.shape != (B, S):
            self._alloc(B, S)
        np.take(self.word, input_ids.reshape(-1), axis=0, out=self.h)
        np.take(self.tt, token_type_ids.reshape(-1), axis=0, out=self.tmp)
        self.h += self.tmp
        self.h.reshape(B, S, self.hidden)[:] += self.pos[None, :S]
        layernorm_packed(self.h, None, self.eg, self.eb, np.float32(1e-12), self.h)
        np.multiply(1.0 - attention_mask, np.finfo(np.float32).min, out=self.mask, casting="unsafe")
        run = self.runners[0]  # one set of scratch buffers shared by all layers
        bufs = (self.h, self.tmp)
        cur = 0
        for P in self.layers:
            run.P = P
            run.o = bufs[1 - cur]
            run(bufs[cur], self.mask)
            cur = 1 - cur
        h = bufs[cur]
        self.cls[:] = h.reshape(B, S, self.hidden)[:, 0]
        D.dense_packed(self.cls, self.pw, self.pb, None, self.pooled, D.ACT_TANH)
        D.dense_packed(self.pooled, self.cw, self.cb, None, self.logits, D.ACT_NONE)
        return self.logits


def bench_model(rounds, inner, num_layers=12, hidden=768, heads=12, ffn=3072):
    from bert_base import build_bert

    print(f"\n== full BertForSequenceClassification ({num_layers} layers, hidden {hidden}), {THREADS} threads, median / p10 ms")
    t0 = time.perf_counter()
    model = build_bert(num_layers, hidden, heads, ffn)
    sess = _session(model)
    ours = OurBert(model, num_layers, hidden, heads, ffn)
    del model
    print(f"   (build + ort session + packing: {time.perf_counter() - t0:.1f} s)")
    for B, S in ((1, 128), (8, 128)):
        rng = np.random.default_rng(2)
        ids = rng.integers(0, 30522, (B, S)).astype(np.int64)
        am = np.ones((B, S), np.int64)
        for b in range(B):
            am[b, S - 13 * b :] = 0 if b else 1
        tt = np.zeros((B, S), np.int64)
        feeds = {"input_ids": ids, "attention_mask": am, "token_type_ids": tt}
        t, t10 = interleaved({"ours": lambda: ours(ids, am, tt), "ort": lambda: sess.run(None, feeds)}, rounds, inner)
        (y,) = sess.run(None, feeds)
        err = float(np.abs(ours(ids, am, tt) - y).max())
        for tag, tt_ in (("med", t), ("p10", t10)):
            print(f"B={B} S={S} {tag}: ours {tt_['ours']:.2f} ms  ort {tt_['ort']:.2f} ms  ours/ort {tt_['ours'] / tt_['ort']:.3f}")
        print(f"    max|logits ours - ort| {err:.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="dense kernel benchmark")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--layer", action="store_true", help="also time one encoder layer")
    ap.add_argument("--model", action="store_true", help="also time the full 12-layer model")
    ap.add_argument("--no-matmul", action="store_true")
    a = ap.parse_args(argv)
    print(
        f"numba {numba.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"onnx {onnx.__version__}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')!r} "
        f"(a forced 'Haswell' makes OpenBLAS use its AVX2 kernels)"
    )
    t0 = time.perf_counter()
    X = np.ones((16, 8), np.float32)
    D.dense_packed(X, D.pack_weight(np.ones((8, 8), np.float32)), None, None, np.empty((16, 8), np.float32), 0)
    print(
        f"first dense call (compile or cache load): {time.perf_counter() - t0:.2f} s; "
        f"threading layer {numba.threading_layer()}, {numba.get_num_threads()} threads"
    )
    print("machine:", machine_load())
    if not a.no_matmul:
        bench_matmul(a.rounds, a.inner)
        print("machine:", machine_load())
    if a.layer:
        bench_layer(a.rounds, a.inner)
        print("machine:", machine_load())
    if a.model:
        bench_model(max(3, a.rounds // 2), max(3, a.inner // 2))
        print("machine:", machine_load())


if __name__ == "__main__":
    main()
