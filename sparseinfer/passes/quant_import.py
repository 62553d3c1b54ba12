"""Quantized ONNX files onto the int8 kernel: rewrite the quantized matmuls onnxruntime writes.

Three forms, each with a constant integer weight:

* dynamic quantization (`onnxruntime.quantization.quantize_dynamic`)::

      xq, sx, zx = DynamicQuantizeLinear(x)
      y = Mul(Cast(MatMulInteger(xq, Wq, zx, zw), to=float), Mul(sx, sw))

  One DynamicQuantizeLinear is shared by every MatMulInteger reading the same x (Q, K and V).
* QDQ (`quantize_static(..., quant_format=QDQ)`)::

      y = MatMul(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(Wq, sw, zw))

  (or a Gemm, whose bias may be a DequantizeLinear of an int32 constant).
* `QLinearMatMul` (`quant_format=QOperator`) and a `MatMulInteger` outside the dynamic pattern.

The first two become one `QDense(x, wq, w_scale, x_scale, x_zero_point, bias, residual)` node
(domain "sparseinfer", semantics in `graph/reference.py`), which the planner lowers to the int8
kernel: the activation quantization (per tensor, dynamic as DynamicQuantizeLinear, or with the
file's static scale and zero point) and the matmul with the dequantization in its epilogue. A
bias Add, an activation and a residual Add after it are absorbed by `fuse_quantized_epilogue`
where the graph has them right after the matmul (in QDQ files a QuantizeLinear/DequantizeLinear
pair usually sits there: it rounds the output, and stays, on the reference executor), and
`merge_qkv` merges the Q, K and V QDense of one input into one, as it does Dense nodes.

Why a new op rather than a Dense marked `quantize="int8"`: such a Dense has an fp32 weight and
fp32 semantics, and the planner quantizes it per row as it likes. A quantized file fixes more:
its own integer weights and scales (re-quantizing the dequantized weight could move values),
activations quantized per tensor (one scale for the whole tensor, so an output row depends on
the other rows) or with static scales. QDense states exactly that, so the reference executor
computes what the file computes, and the int8 kernel reproduces it (bit for bit for the dynamic
form without an activation: exact int32 products, then the same float32 operations in the same
order; with GELU, the kernel's float32 GELU is within 4.2e-7 of the reference's). The QDQ form
computes the matmul of dequantized values in float32; QDense computes the same product exactly
in integers and scales it once, which differs only by float32 rounding.

Conversions, all exact, else the nodes stay as they are (the reference executor runs them):

* the kernel multiplies uint8 activations by int8 weights with zero point 0 (`vpdpbusd` is
  unsigned x signed). A weight with a zero point (uint8, or int8 asymmetric) becomes the int8
  `Wq - zw` when every value fits in [-128, 127]: symmetric uint8 weights (zw = 128) always do;
  asymmetric uint8 ones (onnxruntime's QUInt8 default) span up to [-255, 255] and stay on the
  reference executor (an exact kernel form would need a per-row correction term in its epilogue);
* int8 activations (zero point z) are the uint8 activations `xq + 128` with zero point `z + 128`;
* a per-tensor weight scale or zero point is repeated per column; a per-axis one must be per
  output column (axis 1 of a MatMul weight, axis 0 of a Gemm weight with transB=1);
* QLinearMatMul keeps its node: its output is requantized (rounded to its own scale in float64),
  which a float epilogue cannot reproduce. Only its weight is converted (so is a MatMulInteger's
  outside the dynamic pattern); the planner runs the exact int32 product on the int8 kernel and
  then the requantization with the reference's own function.

Weights or scales computed at run time, scales that are not finite float32 (and positive, for
an activation's), blocked quantization, and activation scales or zero points that differ between
QuantizeLinear and DequantizeLinear are left alone. This pass runs first, before constant folding, which would
otherwise fold DequantizeLinear(Wq) into an fp32 weight and lose the file's integers.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN, constant, dequantize_linear
from ..graph.shapes import infer_shapes
from .fusion import Index, _rewrite, dense_epilogue
from .manager import PassContext, function_pass

_INT8_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))


class _Constants:
    """Constant values as the pass sees them before folding: initializers, Constant nodes, and
    DequantizeLinear of constants (a QDQ file's int32 bias)."""

    def __init__(self, graph: Graph, ix: Index) -> None:
        self.graph, self.ix = graph, ix

    def __call__(self, name: str, dequantize: bool = False) -> np.ndarray | None:
        if not name:
            return None
        c = self.graph.const(name)
        if c is not None:
            return c
        p = self.ix.prod.get(name)
        if p is None or p.domain != "":
            return None
        if p.op == "Constant":
            try:
                return np.asarray(constant(**p.attrs))
            except (ValueError, NotImplementedError, TypeError):
                return None
        if dequantize and p.op == "DequantizeLinear" and not p.attrs.get("block_size", 0):
            args = [self(i) if i else None for i in p.inputs]
            if any(a is None for a, i in zip(args, p.inputs) if i):
                return None
            try:
                return dequantize_linear(*args, axis=p.attrs.get("axis", 1))
            except (ValueError, NotImplementedError):
                return None
        return None


# ----------------------------------------------------------------------------- conversions


def _per_column(p: np.ndarray, n: int) -> np.ndarray | None:
    """A scale or zero point as one value per output column ([N]), or None if it is not one:
    a scalar (per tensor) is repeated; a 1-D one (per axis; the caller checked the axis) must
    have N values."""
    p = np.asarray(p)
    if p.size == 1 and p.ndim <= 1:
        return np.full(n, p.reshape(()), p.dtype)
    if p.ndim == 1 and p.size == n:
        return p
    return None


def exact_int8(wq: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray | None:
    """`wq - zero_point` as int8 ([K, N], zero point per column or None), if it is exactly
    representable: every value in [-128, 127]. None otherwise."""
    w = wq.astype(np.int16)
    if zero_point is not None:
        w = w - zero_point.astype(np.int16)[None, :]
    if w.size and (w.min() < -128 or w.max() > 127):
        return None
    return np.ascontiguousarray(w.astype(np.int8))


def _weight_scale(s: np.ndarray | None) -> bool:
    """A usable weight scale: finite float32 (0 is fine: an all-zero column of a pruned weight)."""
    return s is not None and s.dtype == np.float32 and s.size > 0 and bool(np.all(np.isfinite(s)))


def _activation_scale(s: np.ndarray | None) -> bool:
    """A usable static activation scale: one finite positive float32 (QuantizeLinear divides by it)."""
    return _weight_scale(s) and s.size == 1 and s.ndim <= 1 and bool(s.reshape(()) > 0)


def _activation_params(scale: np.ndarray | None, zero_point: np.ndarray | None, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """A static per-tensor activation quantization as (float32 scale, uint8 zero point)."""
    if not _activation_scale(scale):
        return None
    dtype = np.dtype(zero_point.dtype if zero_point is not None else dtype)
    if dtype not in _INT8_TYPES or (zero_point is not None and (zero_point.size != 1 or zero_point.ndim > 1)):
        return None
    z = 0 if zero_point is None else int(zero_point.reshape(()))
    if dtype == np.int8:
        z += 128  # sat_i8(v) + 128 == sat_u8(v + 128): int8 activations are uint8 ones shifted
    return np.array(scale.reshape(()), np.float32), np.array(z, np.uint8)


class _Weights:
    """int8 [K, N] weights and float32 [N] scales added as constants, one per source weight."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.made: dict[tuple, tuple[str, str]] = {}

    def add(self, key: tuple, base: str, w8: np.ndarray, scale: np.ndarray) -> tuple[str, str]:
        if key not in self.made or self.made[key][0] not in self.graph.values:  # made, then dropped as unused
            g = self.graph
            wname = g.add_constant(g.fresh_name(f"{base}_int8"), w8)
            sname = g.add_constant(g.fresh_name(f"{base}_scale"), np.ascontiguousarray(scale, np.float32))
            self.made[key] = (wname, sname)
        return self.made[key]


def _qdense(x: str, w: str, scale: str, out: str, name: str, x_params: tuple[str, str] | None = None, bias: str = "") -> Node:
    inputs = (x, w, scale) + (x_params or ("", "")) + (bias,)
    while not inputs[-1]:
        inputs = inputs[:-1]
    return Node("QDense", inputs, (out,), {"activation": "none"}, name=name or "qdense", domain=ENGINE_DOMAIN)


def _matmul_input_ok(graph: Graph, x: str) -> bool:
    info = graph.info(x)
    return info.dtype == np.float32 and info.rank is not None and info.rank >= 2


# ----------------------------------------------------------------------------- dynamic


def _match_dynamic(graph: Graph, ix: Index, consts: _Constants, weights: _Weights, mmi: Node):
    """DynamicQuantizeLinear → MatMulInteger → Cast(float) → Mul(·, Mul(x_scale, w_scale)) → QDense."""
    a, b = mmi.inputs[:2]
    azp = mmi.inputs[2] if len(mmi.inputs) > 2 else ""
    bzp = mmi.inputs[3] if len(mmi.inputs) > 3 else ""
    dql = ix.producer(a, "DynamicQuantizeLinear")
    if dql is None or dql.outputs[0] != a or not azp or len(dql.outputs) < 3 or azp != dql.outputs[2]:
        return None
    x, xs = dql.inputs[0], dql.outputs[1]
    cast = ix.only_consumer(mmi.outputs[0], "Cast")
    if cast is None or np.dtype(cast.attrs.get("to")) != np.float32 or not _matmul_input_ok(graph, x):
        return None
    mul = ix.only_consumer(cast.outputs[0], "Mul")
    if mul is None or mul.inputs[0] == mul.inputs[1]:
        return None
    smul = ix.producer(ix.other(mul, cast.outputs[0]), "Mul")
    if smul is None or xs not in smul.inputs or smul.inputs[0] == smul.inputs[1]:
        return None
    wq, ws = consts(b), consts(ix.other(smul, xs))
    if wq is None or wq.ndim != 2 or wq.dtype not in _INT8_TYPES or not _weight_scale(ws):
        return None
    n = wq.shape[1]
    out_rank = graph.info(mul.outputs[0]).rank
    if ws.size != 1 and (ws.size != n or ws.shape[-1] != n or out_rank is None or ws.ndim > out_rank):
        return None  # the scale must be per tensor or per output column
    zw = consts(bzp) if bzp else None
    if bzp and (zw is None or zw.dtype != wq.dtype):
        return None
    scale_col = np.full(n, ws.reshape(-1)[0], np.float32) if ws.size == 1 else ws.reshape(n)
    zw_col = None if zw is None else _per_column(zw, n)
    if zw is not None and zw_col is None:
        return None
    w8 = exact_int8(wq, zw_col)
    if w8 is None:
        return None
    key = ("dynamic", b, bzp, ix.other(smul, xs))
    wname, sname = weights.add(key, b, w8, scale_col)
    return mul, [_qdense(x, wname, sname, mul.outputs[0], mmi.name)]


# ----------------------------------------------------------------------------- QDQ


def _qdq_activation(graph: Graph, ix: Index, consts: _Constants, name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """`name` = DequantizeLinear(QuantizeLinear(x, s, z), s, z) per tensor: (x, s, z as uint8)."""
    dq = ix.producer(name, "DequantizeLinear")
    q = ix.producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if q is None or q.attrs.get("block_size", 0) or dq.attrs.get("block_size", 0) or not _matmul_input_ok(graph, q.inputs[0]):
        return None
    qs, dqs = consts(q.inputs[1]), consts(dq.inputs[1])
    qz = consts(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] else None
    dqz = consts(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if qs is None or dqs is None or (len(q.inputs) > 2 and q.inputs[2] and qz is None):
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] and dqz is None:
        return None
    dtype = graph.info(dq.inputs[0]).dtype
    params = _activation_params(qs, qz, dtype)
    if params is None or _activation_params(dqs, dqz, dtype) is None:
        return None
    same = np.array_equal(qs.reshape(-1), dqs.reshape(-1)) and (
        (0 if qz is None else int(qz.reshape(()))) == (0 if dqz is None else int(dqz.reshape(())))
    )
    return (q.inputs[0], *params) if same else None


def _qdq_weight(
    graph: Graph, ix: Index, consts: _Constants, name: str, transposed: bool
) -> tuple[tuple, str, np.ndarray, np.ndarray] | None:
    """`name` = DequantizeLinear(Wq, scale, zero point) of a constant 2-D integer weight, per tensor
    or per output column: (cache key, name, int8 [K, N], float32 [N]) for QDense."""
    dq = ix.producer(name, "DequantizeLinear")
    if dq is None or dq.attrs.get("block_size", 0):
        return None
    wq, scale = consts(dq.inputs[0]), consts(dq.inputs[1])
    zp = consts(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if wq is None or wq.ndim != 2 or wq.dtype not in _INT8_TYPES or not _weight_scale(scale):
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] and (zp is None or zp.dtype != wq.dtype):
        return None
    view = wq.T if transposed else wq
    n = view.shape[1]
    axis = dq.attrs.get("axis", 1) % 2
    column_axis = 0 if transposed else 1
    if (scale.size != 1 or (zp is not None and zp.size != 1)) and axis != column_axis:
        return None  # per-axis along K: not a per-output-channel scale
    scale_col = _per_column(scale, n)
    zp_col = _per_column(zp, n) if zp is not None else None
    if scale_col is None or (zp is not None and zp_col is None):
        return None
    w8 = exact_int8(view, zp_col)
    if w8 is None:
        return None
    return ("qdq", name, transposed), dq.inputs[0], w8, scale_col


def _match_qdq(graph: Graph, ix: Index, consts: _Constants, weights: _Weights, node: Node):
    """MatMul / Gemm of DequantizeLinear(QuantizeLinear(x)) and DequantizeLinear(Wq) → QDense."""
    bias = ""
    if node.op == "Gemm":
        a = node.attrs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        if graph.info(node.inputs[0]).rank != 2:
            return None
        transposed = bool(a.get("transB", 0))
    else:
        transposed = False
    act = _qdq_activation(graph, ix, consts, node.inputs[0])
    if act is None:
        return None
    w = _qdq_weight(graph, ix, consts, node.inputs[1], transposed)
    if w is None:
        return None
    n = w[2].shape[1]
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2]:
        c = consts(node.inputs[2], dequantize=True)
        if c is None or c.dtype != np.float32 or c.size != n or c.shape[-1] != n or c.ndim > 2:
            return None
        bias = graph.add_constant(graph.fresh_name(f"{node.inputs[2]}_bias"), np.ascontiguousarray(c.reshape(n)))
    wname, sname = weights.add(*w)
    x, s, z = act
    key_s, key_z = graph.fresh_name(f"{x}_scale"), graph.fresh_name(f"{x}_zero_point")
    params = (graph.add_constant(key_s, s), graph.add_constant(key_z, z))
    return node, [_qdense(x, wname, sname, node.outputs[0], node.name, params, bias)]


# ----------------------------------------------------------------------------- integer matmuls kept as they are


def _convert_integer_weight(graph: Graph, ix: Index, consts: _Constants, node: Node):
    """QLinearMatMul / MatMulInteger with a constant uint8 or zero-point weight: the same node
    with the exact int8, zero-point-0 weight (what the planner's int8 step takes)."""
    b_idx, zp_idx = (3, 5) if node.op == "QLinearMatMul" else (1, 3)
    if len(node.inputs) <= b_idx:
        return None
    wq = consts(node.inputs[b_idx])
    zp_name = node.inputs[zp_idx] if len(node.inputs) > zp_idx else ""
    zp = consts(zp_name) if zp_name else None
    if wq is None or wq.ndim != 2 or wq.dtype not in _INT8_TYPES or (zp_name and zp is None):
        return None
    if wq.dtype == np.int8 and (zp is None or not zp.any()):
        return None  # already what the kernel takes
    zp_col = None if zp is None else _per_column(zp, wq.shape[1])
    if zp is not None and zp_col is None:
        return None
    w8 = exact_int8(wq, zp_col)
    if w8 is None:
        return None
    inputs = list(node.inputs)
    inputs[b_idx] = graph.add_constant(graph.fresh_name(f"{node.inputs[b_idx]}_int8"), w8)
    if zp_name:
        inputs[zp_idx] = graph.add_constant(graph.fresh_name(f"{zp_name}_int8"), np.zeros(zp.shape, np.int8))
    return node, [node.replace(inputs=tuple(inputs))]


# ----------------------------------------------------------------------------- the passes


@function_pass("import_quantized", opt_level=1)
def import_quantized(graph: Graph, ctx: PassContext) -> int:
    """The quantized matmuls of onnxruntime's dynamic and QDQ forms → QDense; integer weights of
    QLinearMatMul / MatMulInteger converted exactly to int8 with zero point 0 (see the module
    docstring)."""
    weights = _Weights(graph)

    def dynamic_or_integer(g: Graph, ix: Index, node: Node):
        consts = _Constants(g, ix)
        return _match_dynamic(g, ix, consts, weights, node) or _convert_integer_weight(g, ix, consts, node)

    def qdq(g: Graph, ix: Index, node: Node):
        return _match_qdq(g, ix, _Constants(g, ix), weights, node)

    def qlinear(g: Graph, ix: Index, node: Node):
        return _convert_integer_weight(g, ix, _Constants(g, ix), node)

    return _rewrite(graph, {"MatMulInteger": dynamic_or_integer, "MatMul": qdq, "Gemm": qdq, "QLinearMatMul": qlinear})


@function_pass("fuse_quantized_epilogue", opt_level=1, requires=("import_quantized", "fuse_gelu"))
def fuse_quantized_epilogue(graph: Graph, ctx: PassContext) -> int:
    """A bias Add, an activation and a residual Add right after a QDense → its epilogue."""
    changed = 0
    progress = True
    while progress:
        progress = False
        ix = Index(graph)
        for node in graph.nodes:
            if node.domain != ENGINE_DOMAIN or node.op != "QDense" or len(node.inputs) > 5:
                continue  # not one, or it has a bias or residual already
            if node.attrs.get("activation", "none") != "none":
                continue
            n = graph.const(node.inputs[1]).shape[1]
            last, bias, activation, residual = dense_epilogue(graph, ix, node, n)
            if last is node:
                continue
            inputs = tuple(node.inputs) + ("",) * (5 - len(node.inputs))
            inputs += (_flat_bias(graph, bias, n) if bias else "", residual or "")
            while not inputs[-1]:
                inputs = inputs[:-1]
            fused = node.replace(inputs=inputs, outputs=last.outputs[:1], attrs=dict(node.attrs, activation=activation))
            graph.replace_node(last, fused)  # the QDense and the absorbed nodes are dead now
            changed += 1
            progress = True
            break
        graph.remove_unused()
    if changed:
        infer_shapes(graph)
    return changed


def _flat_bias(graph: Graph, name: str, n: int) -> str:
    c = graph.const(name)
    if c.ndim == 1 and c.dtype == np.float32:
        return name
    return graph.add_constant(graph.fresh_name(name), np.ascontiguousarray(c.reshape(n), np.float32))
