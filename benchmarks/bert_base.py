"""Build a BERT-shaped ONNX model with random weights (no torch needed).

The graph reproduces what ``torch.onnx.export`` (TorchScript exporter,
``dynamo=False``) emits for transformers' ``BertForSequenceClassification``
with dynamic ``batch`` / ``sequence`` axes (compare the exported fixtures in
``tests/fixtures/models/bert-sequence-classification``):

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64
  ``[batch, sequence]``), output ``logits`` (float32 ``[batch, num_labels]``);
* embeddings: ``Gather`` of word / token-type / position embeddings (position
  ids are a constant ``[1, max_pos]`` buffer sliced to the sequence length via
  ``Shape -> Gather -> Unsqueeze -> Slice``) and two ``Add``;
* LayerNorm: ``LayerNormalization`` at opset >= 17, the decomposed
  ``ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add`` below;
* linear layers: ``MatMul`` with a pre-transposed ``[in, out]`` weight, then
  ``Add(bias, matmul)`` (bias first, as torch emits it);
* head split: ``Shape/Gather/Unsqueeze/Concat`` shape chains, ``Reshape``,
  ``Transpose``; head merge: ``Transpose``, ``Concat``, ``Reshape``;
* GELU: ``Div(sqrt 2), Erf, Add 1, Mul, Mul 0.5``;
* pooler: ``Gather`` of token 0 (axis 1), ``Gemm`` (transB=1), ``Tanh``;
  classifier ``Gemm`` (transB=1).

Two attention patterns are available:

``attention="sdpa"`` (default; what transformers >= 4.36 with the default
SDPA attention exports, and what the fixtures contain): the mask goes through
``Unsqueeze, Unsqueeze, Concat/Reshape/ConstantOfShape/Equal/Where, Expand,
Cast float, Sub(1.0, m), Cast bool, Cast bool, Where(bool, float32 min, sub)``
giving a ``[batch, 1, seq, seq]`` additive mask, and the decomposed scaled
dot-product attention multiplies Q and K^T by ``sqrt(1 / sqrt(head_dim))``
(computed in-graph from ``Shape``) before ``MatMul, Add mask, Softmax,
MatMul V``.

``attention="eager"`` (transformers' eager attention / older exports): the
extended mask is ``Unsqueeze, Unsqueeze, Cast float, Sub(1.0, m), Mul(float32
min = -3.4028234663852886e+38)`` (``[batch, 1, 1, seq]``) and scores are
``MatMul(Q, K^T), Div(sqrt(head_dim)), Add mask, Softmax, MatMul V``.

Weights are ``N(0, 0.02)`` (biases too, so nothing is trivially zero) from
``numpy.random.default_rng(seed)``; LayerNorm gains are ``1 + N(0, 0.02)``.

CLI::

    python benchmarks/bert_base.py --out /tmp/bert_base.onnx [--layers 12 ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_bert"]

F32_MIN = float(np.finfo(np.float32).min)  # -3.4028234663852886e+38
LN_EPS = 1e-12


class _G:
    """Tiny graph builder with torch-like node names."""

    def __init__(self, rng):
        self.nodes = []
        self.inits = []
        self.rng = rng
        self.counts = {}
        self.mm = 0

    def _name(self, scope, op):
        key = (scope, op)
        i = self.counts.get(key, 0)
        self.counts[key] = i + 1
        return f"{scope}/{op}" + (f"_{i}" if i else "")

    def node(self, op, inputs, scope, **attrs):
        name = self._name(scope, op)
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, value, scope, dtype=None):
        arr = np.array(value, dtype=dtype)
        return self.node("Constant", [], scope, value=numpy_helper.from_array(arr))

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def randn(self, *shape, std=0.02, mean=0.0):
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def matmul_weight(self, arr):
        self.mm += 1
        return self.init(f"onnx::MatMul_{1000 + self.mm}", arr)


def _layernorm(g, x, prefix, scope, hidden, opset):
    w = g.init(f"{prefix}.weight", g.randn(hidden, mean=1.0))
    b = g.init(f"{prefix}.bias", g.randn(hidden))
    if opset >= 17:
        return g.node("LayerNormalization", [x, w, b], scope, axis=-1, epsilon=LN_EPS)
    mean = g.node("ReduceMean", [x], scope, axes=[-1])
    sub = g.node("Sub", [x, mean], scope)
    pw = g.node("Pow", [sub, g.const(2.0, scope, np.float32)], scope)
    var = g.node("ReduceMean", [pw], scope, axes=[-1])
    add = g.node("Add", [var, g.const(LN_EPS, scope, np.float32)], scope)
    sq = g.node("Sqrt", [add], scope)
    div = g.node("Div", [sub, sq], scope)
    mul = g.node("Mul", [div, w], scope)
    return g.node("Add", [mul, b], scope)


def _linear(g, x, prefix, scope, n_in, n_out):
    w = g.matmul_weight(g.randn(n_in, n_out))
    b = g.init(f"{prefix}.bias", g.randn(n_out))
    mm = g.node("MatMul", [x, w], scope)
    return g.node("Add", [b, mm], scope)


def _unsq0(g, x, scope):
    return g.node("Unsqueeze", [x, g.const([0], scope, np.int64)], scope)


def _dim(g, x, i, scope):
    shape = g.node("Shape", [x], scope)
    return g.node("Gather", [shape, g.const(i, scope, np.int64)], scope, axis=0)


def _layer(g, h, mask, i, hidden, heads, ffn, opset, attention):
    d = hidden // heads
    pre = f"bert.encoder.layer.{i}"
    s_self = f"/bert/encoder/layer.{i}/attention/self"
    batch = _dim(g, h, 0, s_self)
    seq = _dim(g, h, 1, s_self)

    def split_shape():
        return g.node(
            "Concat",
            [_unsq0(g, batch, s_self), g.const([-1], s_self, np.int64), g.const([heads], s_self, np.int64), g.const([d], s_self, np.int64)],
            s_self,
            axis=0,
        )

    q = _linear(g, h, f"{pre}.attention.self.query", f"{s_self}/query", hidden, hidden)
    shp_q, shp_k, shp_v = split_shape(), split_shape(), split_shape()
    q = g.node("Transpose", [g.node("Reshape", [q, shp_q], s_self, allowzero=0)], s_self, perm=[0, 2, 1, 3])
    k = _linear(g, h, f"{pre}.attention.self.key", f"{s_self}/key", hidden, hidden)
    k = g.node("Reshape", [k, shp_k], s_self, allowzero=0)
    v = _linear(g, h, f"{pre}.attention.self.value", f"{s_self}/value", hidden, hidden)
    v = g.node("Transpose", [g.node("Reshape", [v, shp_v], s_self, allowzero=0)], s_self, perm=[0, 2, 1, 3])
    if attention == "sdpa":
        shape = g.node("Shape", [q], s_self)
        last = g.node("Slice", [shape, g.const([-1], s_self, np.int64), g.const([np.iinfo(np.int64).max], s_self, np.int64)], s_self)
        sq = g.node("Sqrt", [g.node("Cast", [last], s_self, to=TensorProto.FLOAT)], s_self)
        scale = g.node("Div", [g.const([1.0], s_self, np.float32), sq], s_self)
        scale = g.node("Cast", [scale], s_self, to=TensorProto.FLOAT)
        kt = g.node("Transpose", [k], s_self, perm=[0, 2, 3, 1])
        qs = g.node("Mul", [q, g.node("Sqrt", [scale], s_self)], s_self)
        ks = g.node("Mul", [kt, g.node("Sqrt", [scale], s_self)], s_self)
        scores = g.node("MatMul", [qs, ks], s_self)
    else:
        kt = g.node("Transpose", [k], s_self, perm=[0, 2, 3, 1])
        scores = g.node("MatMul", [q, kt], s_self)
        scores = g.node("Div", [scores, g.const(float(np.float32(np.sqrt(d))), s_self, np.float32)], s_self)
    scores = g.node("Add", [scores, mask], s_self)
    probs = g.node("Softmax", [scores], s_self, axis=-1)
    ctx = g.node("MatMul", [probs, v], s_self)
    ctx = g.node("Transpose", [ctx], s_self, perm=[0, 2, 1, 3])
    merge = g.node("Concat", [_unsq0(g, batch, s_self), _unsq0(g, seq, s_self), g.const([hidden], s_self, np.int64)], s_self, axis=0)
    ctx = g.node("Reshape", [ctx, merge], s_self, allowzero=0)

    s_ao = f"/bert/encoder/layer.{i}/attention/output"
    a = _linear(g, ctx, f"{pre}.attention.output.dense", f"{s_ao}/dense", hidden, hidden)
    a = g.node("Add", [a, h], s_ao)
    a = _layernorm(g, a, f"{pre}.attention.output.LayerNorm", f"{s_ao}/LayerNorm", hidden, opset)

    s_int = f"/bert/encoder/layer.{i}/intermediate"
    f = _linear(g, a, f"{pre}.intermediate.dense", f"{s_int}/dense", hidden, ffn)
    s_act = f"{s_int}/intermediate_act_fn"
    div = g.node("Div", [f, g.const(1.4142135381698608, s_act, np.float32)], s_act)
    erf = g.node("Erf", [div], s_act)
    add = g.node("Add", [erf, g.const(1.0, s_act, np.float32)], s_act)
    mul = g.node("Mul", [f, add], s_act)
    f = g.node("Mul", [mul, g.const(0.5, s_act, np.float32)], s_act)

    s_out = f"/bert/encoder/layer.{i}/output"
    o = _linear(g, f, f"{pre}.output.dense", f"{s_out}/dense", ffn, hidden)
    o = g.node("Add", [o, a], s_out)
    return _layernorm(g, o, f"{pre}.output.LayerNorm", f"{s_out}/LayerNorm", hidden, opset)


def _extended_mask(g, q_len, attention_mask, attention):
    s = "/bert"
    m = g.node("Unsqueeze", [attention_mask, g.const([1], s, np.int64)], s)
    m = g.node("Unsqueeze", [m, g.const([2], s, np.int64)], s)
    if attention == "eager":
        m = g.node("Cast", [m], s, to=TensorProto.FLOAT)
        m = g.node("Sub", [g.const(1.0, s, np.float32), m], s)
        return g.node("Mul", [m, g.const(F32_MIN, s, np.float32)], s)
    # transformers' _prepare_4d_attention_mask_for_sdpa / _expand_mask
    batch = _dim(g, attention_mask, 0, s)
    kv_len = _dim(g, attention_mask, 1, s)
    shape = g.node("Concat", [_unsq0(g, batch, s), g.const([1], s, np.int64), _unsq0(g, q_len, s), _unsq0(g, kv_len, s)], s, axis=0)
    shape = g.node("Reshape", [shape, g.const([-1], s, np.int64)], s, allowzero=0)
    ones = g.node("ConstantOfShape", [g.node("Shape", [shape], s)], s, value=numpy_helper.from_array(np.array([1], np.int64)))
    neg = g.node("Mul", [ones, g.const(-1, s, np.int64)], s)
    eq = g.node("Equal", [shape, neg], s)
    shape = g.node("Where", [eq, ones, shape], s)
    m = g.node("Expand", [m, shape], s)
    m = g.node("Cast", [m], s, to=TensorProto.FLOAT)
    inv = g.node("Sub", [g.const(1.0, s, np.float32), m], s)
    cond = g.node("Cast", [g.node("Cast", [inv], s, to=TensorProto.BOOL)], s, to=TensorProto.BOOL)
    return g.node("Where", [cond, g.const(F32_MIN, s, np.float32), inv], s)


def build_bert(
    num_layers=12,
    hidden=768,
    heads=12,
    ffn=3072,
    vocab=30522,
    max_pos=512,
    num_labels=2,
    seed=0,
    *,
    opset=17,
    attention="sdpa",
    type_vocab=2,
):
    """Return a BertForSequenceClassification-shaped ``onnx.ModelProto``."""
    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    if attention not in ("sdpa", "eager"):
        raise ValueError("attention must be 'sdpa' or 'eager'")
    g = _G(np.random.default_rng(seed))
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])]

    s = "/bert/embeddings"
    word = g.init("bert.embeddings.word_embeddings.weight", g.randn(vocab, hidden))
    pos = g.init("bert.embeddings.position_embeddings.weight", g.randn(max_pos, hidden))
    tt = g.init("bert.embeddings.token_type_embeddings.weight", g.randn(type_vocab, hidden))
    seq = _dim(g, "input_ids", 1, "/bert")
    pos_ids = g.const(np.arange(max_pos, dtype=np.int64)[None, :], s)
    pos_ids = g.node(
        "Slice", [pos_ids, g.const([0], s, np.int64), _unsq0(g, seq, s), g.const([1], s, np.int64), g.const([1], s, np.int64)], s
    )
    e = g.node(
        "Add",
        [
            g.node("Gather", [word, "input_ids"], f"{s}/word_embeddings"),
            g.node("Gather", [tt, "token_type_ids"], f"{s}/token_type_embeddings"),
        ],
        s,
    )
    e = g.node("Add", [e, g.node("Gather", [pos, pos_ids], f"{s}/position_embeddings")], s)
    h = _layernorm(g, e, "bert.embeddings.LayerNorm", f"{s}/LayerNorm", hidden, opset)

    mask = _extended_mask(g, seq, "attention_mask", attention)
    for i in range(num_layers):
        h = _layer(g, h, mask, i, hidden, heads, ffn, opset, attention)

    s = "/bert/pooler"
    cls = g.node("Gather", [h, g.const(0, s, np.int64)], s, axis=1)
    pw = g.init("bert.pooler.dense.weight", g.randn(hidden, hidden))
    pb = g.init("bert.pooler.dense.bias", g.randn(hidden))
    pooled = g.node("Tanh", [g.node("Gemm", [cls, pw, pb], f"{s}/dense", alpha=1.0, beta=1.0, transB=1)], f"{s}/activation")
    cw = g.init("classifier.weight", g.randn(num_labels, hidden))
    cb = g.init("classifier.bias", g.randn(num_labels))
    g.nodes.append(helper.make_node("Gemm", [pooled, cw, cb], ["logits"], name="/classifier/Gemm", alpha=1.0, beta=1.0, transB=1))

    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch", ir_version=8)
    return model


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--max-pos", type=int, default=512)
    ap.add_argument("--labels", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--check", action="store_true", help="run onnx.checker and onnxruntime")
    a = ap.parse_args(argv)
    model = build_bert(a.layers, a.hidden, a.heads, a.ffn, a.vocab, a.max_pos, a.labels, a.seed, opset=a.opset, attention=a.attention)
    onnx.save(model, a.out)
    print(f"wrote {a.out} ({sum(t.ByteSize() for t in model.graph.initializer) / 1e6:.1f} MB of weights, {len(model.graph.node)} nodes)")
    if a.check:
        import onnxruntime as ort

        onnx.checker.check_model(a.out)
        sess = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(0).integers(0, a.vocab, (2, 16)).astype(np.int64)
        am = np.ones_like(ids)
        am[1, 10:] = 0
        (logits,) = sess.run(None, {"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids)})
        print("onnxruntime logits", logits.shape, logits.ravel()[:4])


if __name__ == "__main__":
    _main()
