"""Shape and dtype inference with symbolic dimensions.

A dimension is an int, a symbol (a string such as "batch" or "sequence") or None (unknown).
Exporters compute reshape targets at run time (Shape → Gather → Unsqueeze → Concat → Reshape),
so besides shapes we propagate the *values* of small integer tensors. Those values live in
object arrays whose elements are ints, symbols or None, which lets the reference functions of
the pure data-movement ops (Gather, Concat, Slice, …) compute them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .ir import Dim, Graph, Node, Shape, TensorInfo
from .reference import _axis, slice_bounds
from .registry import lookup_version

_MAX_TRACKED = 64  # elements: shape-like tensors are tiny; bigger ones are not value-tracked
_BOOL = np.dtype(bool)
_I64 = np.dtype(np.int64)


class ShapeError(ValueError):
    """Shapes that cannot work together (e.g. broadcasting 3 against 4)."""


# ------------------------------------------------------------------ dimension algebra


def broadcast_dims(a: Dim, b: Dim) -> Dim:
    """Numpy broadcasting of two (possibly symbolic) dims."""
    if a == b:
        return a
    if a == 1:
        return b
    if b == 1:
        return a
    if isinstance(a, int) and isinstance(b, int):
        raise ShapeError(f"dimensions {a} and {b} cannot be broadcast together")
    if isinstance(a, int):  # a symbol broadcast against n > 1 must be 1 or n: the result is n
        return a
    if isinstance(b, int):
        return b
    return None  # two different symbols, or unknowns


def broadcast_shapes(*shapes: Shape | None) -> Shape | None:
    """Multidirectional (numpy) broadcasting of symbolic shapes; None if any rank is unknown."""
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = [1] * rank
    for s in shapes:
        padded = (1,) * (rank - len(s)) + tuple(s)
        try:
            out = [broadcast_dims(a, b) for a, b in zip(out, padded)]
        except ShapeError as exc:
            raise ShapeError(f"shapes {list(shapes)} cannot be broadcast together: {exc}") from None
    return tuple(out)


def _factors(d: Dim) -> tuple[int, list[str]] | None:
    """A dim as (integer coefficient, symbol factors): "4*batch" → (4, ["batch"]); None if unknown."""
    if d is None:
        return None
    if isinstance(d, (int, np.integer)):
        return int(d), []
    coef, syms = 1, []
    for part in d.split("*"):
        if part.isdigit():
            coef *= int(part)
        else:
            syms.append(part)
    return coef, syms


def _from_factors(coef: int, syms: list[str]) -> Dim:
    if not syms:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + sorted(syms))


def _prod(dims: Sequence[Dim]) -> Dim:
    """Product of dims; symbolic products are written canonically, e.g. "4*batch*sequence"."""
    coef, syms = 1, []
    for d in dims:
        f = _factors(d)
        if f is None:
            return None
        coef *= f[0]
        syms += f[1]
    return 0 if coef == 0 else _from_factors(coef, syms)


# ------------------------------------------------------------------ value tracking


def _as_value(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is None or arr.dtype.kind not in "iub" or arr.size > _MAX_TRACKED:
        return None
    return arr.astype(object) if arr.dtype.kind != "b" else arr


def _concrete(v: np.ndarray | None) -> np.ndarray | None:
    """The value as a plain int64/bool array, if every element is known."""
    if v is None:
        return None
    if v.dtype == object:
        if any(not isinstance(x, (int, np.integer)) for x in v.reshape(-1)):
            return None
        return v.astype(np.int64)
    return v


def _value_shape(v: np.ndarray | None) -> Shape | None:
    """A 1-D shape tensor's value as a shape tuple."""
    if v is None or v.ndim != 1:
        return None
    return tuple(x if isinstance(x, str) or x is None else int(x) for x in v)


_SYM_ARITH: dict[str, Callable[[Dim, Dim], Dim]] = {
    "Mul": lambda a, b: a * b if isinstance(a, int) and isinstance(b, int) else (b if a == 1 else a if b == 1 else None),
    "Add": lambda a, b: a + b if isinstance(a, int) and isinstance(b, int) else (b if a == 0 else a if b == 0 else None),
    "Sub": lambda a, b: a - b if isinstance(a, int) and isinstance(b, int) else (a if b == 0 else None),
    "Div": lambda a, b: (a // b if a % b == 0 else None) if isinstance(a, int) and isinstance(b, int) and b else (a if b == 1 else None),
    # A symbol stands for a size ≥ 1, so it never equals 0 or -1 (the markers reshape chains test for).
    "Equal": lambda a, b: (
        a == b
        if isinstance(a, int) and isinstance(b, int)
        else (False if (isinstance(a, int) and a <= 0) or (isinstance(b, int) and b <= 0) else None)
    ),
}
# Ops whose reference function only moves elements around, so it works on object arrays.
_MOVERS = {"Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Reshape", "Identity", "Expand", "Where", "Transpose", "Flatten"}


def _propagate_value(node: Node, ins: list[np.ndarray | None], infos: list[TensorInfo | None]) -> list[np.ndarray | None] | None:
    """Values of a node's outputs from its inputs' (possibly symbolic) values, where cheap."""
    op = node.op
    if op == "Shape" and infos[0] is not None and infos[0].shape is not None:
        dims = infos[0].shape[slice(node.attrs.get("start", 0), node.attrs.get("end"))]
        return [np.array(list(dims), dtype=object).reshape(len(dims))]
    if op == "Size" and infos[0] is not None and infos[0].shape is not None:
        return [np.array(_prod(infos[0].shape), dtype=object)]
    if op == "Constant":
        return [_as_value(lookup_version(op, node.version).fn(**node.attrs))]
    needed = [v for v, name in zip(ins, node.inputs) if name]
    if any(v is None for v in needed):
        return None
    concrete = [_concrete(v) if v is not None else None for v in ins]
    if all(c is not None for c, name in zip(concrete, node.inputs) if name):
        # Every input known: run the reference op itself.
        try:
            out = lookup_version(op, node.version, node.domain).fn(*concrete, **node.attrs)
        except Exception:  # the real run will report it with context; inference just gives up
            return None
        outs = out if isinstance(out, tuple) else (out,)
        return [_as_value(np.asarray(o)) for o in outs]
    if op in ("Cast", "CastLike"):
        return [ins[0]] if np.dtype(node.attrs.get("to", _I64) if op == "Cast" else _I64).kind in "iu" else None
    if op in _MOVERS:
        try:
            out = lookup_version(op, node.version, node.domain).fn(
                *(c if c is not None and i > 0 else v for i, (v, c) in enumerate(zip(ins, concrete))), **node.attrs
            )
        except Exception:
            return None
        return [np.asarray(out, dtype=object)]
    if op in _SYM_ARITH and len(ins) == 2:
        a, b = np.broadcast_arrays(ins[0].astype(object), ins[1].astype(object))
        fn = _SYM_ARITH[op]
        flat = [fn(x, y) for x, y in zip(a.reshape(-1), b.reshape(-1))]
        return [np.array(flat, dtype=object).reshape(a.shape)]
    return None


# ------------------------------------------------------------------ per-op shape rules

Rule = Callable[[Node, list[TensorInfo], list[np.ndarray | None]], list[TensorInfo]]
_RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return wrap


def _same(i: TensorInfo, dtype=None) -> TensorInfo:
    return TensorInfo(dtype if dtype is not None else i.dtype, i.shape)


@rule(
    "Abs",
    "Neg",
    "Sqrt",
    "Exp",
    "Log",
    "Tanh",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Sign",
    "Sin",
    "Cos",
    "Relu",
    "Sigmoid",
    "Erf",
    "Identity",
    "Round",
    "Gelu",
    "Softmax",
    "LogSoftmax",
    "CumSum",
    "Trilu",
)
def _unary(node, ins, vals):
    return [_same(ins[0])]


@rule("IsNaN", "IsInf", "Not")
def _predicate(node, ins, vals):
    return [_same(ins[0], _BOOL)]


@rule("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean")
def _arith(node, ins, vals):
    return [TensorInfo(ins[0].dtype, broadcast_shapes(*(i.shape for i in ins)))]


@rule("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
def _compare(node, ins, vals):
    return [TensorInfo(_BOOL, broadcast_shapes(*(i.shape for i in ins)))]


@rule("Where")
def _where(node, ins, vals):
    return [TensorInfo(ins[1].dtype, broadcast_shapes(*(i.shape for i in ins)))]


@rule("Clip")
def _clip(node, ins, vals):
    return [_same(ins[0])]


@rule("Cast")
def _cast(node, ins, vals):
    return [_same(ins[0], node.attrs["to"])]


@rule("CastLike")
def _cast_like(node, ins, vals):
    return [_same(ins[0], ins[1].dtype)]


@rule("Dropout")
def _dropout(node, ins, vals):
    return [_same(ins[0]), _same(ins[0], _BOOL)]


@rule("Shape")
def _shape(node, ins, vals):
    rank = ins[0].rank
    n = None if rank is None else len(range(rank)[slice(node.attrs.get("start", 0), node.attrs.get("end"))])
    return [TensorInfo(_I64, (n,))]


@rule("Size")
def _size(node, ins, vals):
    return [TensorInfo(_I64, ())]


@rule("ConstantOfShape")
def _constant_of_shape(node, ins, vals):
    value = node.attrs.get("value")
    dtype = np.float32 if value is None else np.asarray(value).dtype
    shape = _value_shape(vals[0])
    if shape is None and ins[0].shape is not None and isinstance(ins[0].shape[0], int):
        shape = (None,) * ins[0].shape[0]
    return [TensorInfo(dtype, shape)]


@rule("Range")
def _range(node, ins, vals):
    return [TensorInfo(ins[0].dtype, (None,))]


@rule("Reshape")
def _reshape(node, ins, vals):
    target = _value_shape(vals[1])
    if target is None:
        n = ins[1].shape[0] if ins[1].shape else None
        return [TensorInfo(ins[0].dtype, None if not isinstance(n, int) else (None,) * n)]
    src = ins[0].shape
    dims = list(target)
    if not node.attrs.get("allowzero", 0):
        dims = [(src[i] if src is not None and i < len(src) else None) if d == 0 else d for i, d in enumerate(dims)]
    if -1 in dims:
        dims[dims.index(-1)] = _infer_minus_one(src, [d for d in dims if d != -1])
    return [TensorInfo(ins[0].dtype, tuple(dims))]


def _infer_minus_one(src: Shape | None, known: list[Dim]) -> Dim:
    """The size of a reshape's -1 dim: input elements / known output elements, symbols cancelling."""
    total, part = _factors(_prod(src)) if src is not None else None, _factors(_prod(known))
    if total is None or part is None or part[0] == 0 or total[0] % part[0]:
        return None
    syms = list(total[1])
    for sym in part[1]:
        if sym not in syms:
            return None
        syms.remove(sym)
    return _from_factors(total[0] // part[0], syms)


@rule("Flatten")
def _flatten(node, ins, vals):
    s = ins[0].shape
    if s is None:
        return [TensorInfo(ins[0].dtype, (None, None))]
    axis = node.attrs.get("axis", 1)
    axis = axis + len(s) if axis < 0 else axis
    return [TensorInfo(ins[0].dtype, (_prod(s[:axis]), _prod(s[axis:])))]


@rule("Squeeze")
def _squeeze(node, ins, vals):
    s = ins[0].shape
    axes = _concrete(vals[1]) if len(vals) > 1 and vals[1] is not None else None
    if s is None:
        return [TensorInfo(ins[0].dtype, None)]
    if len(node.inputs) < 2 or not node.inputs[1]:
        if any(not isinstance(d, int) for d in s):
            return [TensorInfo(ins[0].dtype, None)]
        return [TensorInfo(ins[0].dtype, tuple(d for d in s if d != 1))]
    if axes is None:
        return [TensorInfo(ins[0].dtype, None)]
    drop = {_axis(int(a), len(s), "Squeeze") for a in axes.reshape(-1)}
    for a in drop:
        if isinstance(s[a], int) and s[a] != 1:
            raise ShapeError(f"Squeeze: axis {a} has size {s[a]}, not 1")
    return [TensorInfo(ins[0].dtype, tuple(d for i, d in enumerate(s) if i not in drop))]


@rule("Unsqueeze")
def _unsqueeze(node, ins, vals):
    s, axes = ins[0].shape, _concrete(vals[1]) if len(vals) > 1 else None
    if s is None or axes is None:
        return [TensorInfo(ins[0].dtype, None)]
    rank = len(s) + axes.size
    new = {_axis(int(a), rank, "Unsqueeze") for a in axes.reshape(-1)}
    it = iter(s)
    return [TensorInfo(ins[0].dtype, tuple(1 if i in new else next(it) for i in range(rank)))]


@rule("Transpose")
def _transpose(node, ins, vals):
    s = ins[0].shape
    if s is None:
        return [TensorInfo(ins[0].dtype, None)]
    perm = node.attrs.get("perm") or list(reversed(range(len(s))))
    return [TensorInfo(ins[0].dtype, tuple(s[p] for p in perm))]


@rule("Concat")
def _concat(node, ins, vals):
    shapes = [i.shape for i in ins]
    if any(s is None for s in shapes):
        return [TensorInfo(ins[0].dtype, None)]
    rank = len(shapes[0])
    ax = _axis(node.attrs["axis"], rank, "Concat")
    total = _sum_dims([s[ax] for s in shapes])
    out = [total if i == ax else next((s[i] for s in shapes if s[i] is not None), None) for i in range(rank)]
    return [TensorInfo(ins[0].dtype, tuple(out))]


def _sum_dims(dims: Sequence[Dim]) -> Dim:
    return sum(dims) if all(isinstance(d, int) for d in dims) else None


@rule("Split")
def _split(node, ins, vals):
    s = ins[0].shape
    n = len(node.outputs)
    if s is None:
        return [TensorInfo(ins[0].dtype, None)] * n
    ax = _axis(node.attrs.get("axis", 0), len(s), "Split")
    sizes = _concrete(vals[1]) if len(vals) > 1 and vals[1] is not None else None
    if sizes is not None:
        parts: list[Dim] = [int(x) for x in sizes]
    elif isinstance(s[ax], int):
        chunk = -(-s[ax] // n)
        parts = [min(chunk, s[ax] - i * chunk) for i in range(n)]
    else:
        parts = [None] * n
    return [TensorInfo(ins[0].dtype, s[:ax] + (p,) + s[ax + 1 :]) for p in parts]


@rule("Slice")
def _slice(node, ins, vals):
    s = ins[0].shape
    if s is None:
        return [TensorInfo(ins[0].dtype, None)]
    has = [i < len(node.inputs) and bool(node.inputs[i]) for i in range(5)]
    starts, ends = vals[1], vals[2]
    axes = _concrete(vals[3]) if has[3] else np.arange(len(starts) if starts is not None else 0)
    steps = vals[4] if has[4] else None
    if starts is None or ends is None or axes is None or (has[4] and steps is None):
        return [TensorInfo(ins[0].dtype, (None,) * len(s))]
    steps = [1] * starts.size if steps is None else list(steps.reshape(-1))
    out = list(s)
    for st, en, ax, step in zip(starts.reshape(-1), ends.reshape(-1), axes.reshape(-1), steps):
        ax = _axis(int(ax), len(s), "Slice")
        out[ax] = _slice_dim(s[ax], st, en, step)
    return [TensorInfo(ins[0].dtype, tuple(out))]


def _slice_dim(dim: Dim, start: Dim, end: Dim, step: Dim) -> Dim:
    if all(isinstance(v, (int, np.integer)) for v in (dim, start, end, step)):
        s, e = slice_bounds(int(dim), int(start), int(end), int(step))
        return len(range(s, e, int(step)))
    if start == 0 and step == 1:
        if isinstance(end, (int, np.integer)) and end >= 2**31 - 1:
            return dim  # "to the end": the whole (symbolic) dim
        if isinstance(end, str):
            return end  # [0:sequence] of a longer buffer (position ids): valid inputs never exceed it
    return None


@rule("Gather")
def _gather(node, ins, vals):
    d, i = ins[0].shape, ins[1].shape
    if d is None or i is None:
        return [TensorInfo(ins[0].dtype, None)]
    ax = _axis(node.attrs.get("axis", 0), len(d), "Gather")
    return [TensorInfo(ins[0].dtype, d[:ax] + i + d[ax + 1 :])]


@rule("GatherElements")
def _gather_elements(node, ins, vals):
    return [TensorInfo(ins[0].dtype, ins[1].shape)]


@rule("Expand")
def _expand(node, ins, vals):
    target = _value_shape(vals[1])
    if target is None:
        n = ins[1].shape[0] if ins[1].shape else None
        rank = max(n, ins[0].rank) if isinstance(n, int) and ins[0].rank is not None else None
        return [TensorInfo(ins[0].dtype, None if rank is None else (None,) * rank)]
    return [TensorInfo(ins[0].dtype, broadcast_shapes(ins[0].shape, target))]


@rule("Tile")
def _tile(node, ins, vals):
    reps, s = _concrete(vals[1]), ins[0].shape
    if reps is None or s is None:
        return [TensorInfo(ins[0].dtype, None if s is None else (None,) * len(s))]
    return [TensorInfo(ins[0].dtype, tuple(d * int(r) if isinstance(d, int) else (d if r == 1 else None) for d, r in zip(s, reps)))]


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
def _reduce(node, ins, vals):
    s = ins[0].shape
    keep = node.attrs.get("keepdims", 1)
    has_axes = len(node.inputs) > 1 and node.inputs[1]
    axes = _concrete(vals[1]) if has_axes else None
    if s is None or (has_axes and axes is None):
        return [TensorInfo(ins[0].dtype, None)]
    if axes is None or axes.size == 0:
        if node.attrs.get("noop_with_empty_axes", 0):
            return [_same(ins[0])]
        red = set(range(len(s)))
    else:
        red = {_axis(int(a), len(s), node.op) for a in axes.reshape(-1)}
    out = tuple(1 if i in red else d for i, d in enumerate(s) if keep or i not in red)
    return [TensorInfo(ins[0].dtype, out)]


@rule("ArgMax", "ArgMin")
def _argreduce(node, ins, vals):
    s = ins[0].shape
    if s is None:
        return [TensorInfo(_I64, None)]
    ax = _axis(node.attrs.get("axis", 0), len(s), node.op)
    keep = node.attrs.get("keepdims", 1)
    return [TensorInfo(_I64, tuple(1 if i == ax else d for i, d in enumerate(s) if keep or i != ax))]


@rule("LayerNormalization")
def _layer_norm(node, ins, vals):
    s = ins[0].shape
    stash = np.float32 if node.attrs.get("stash_type", 1) == 1 else ins[0].dtype
    if s is None:
        stats = TensorInfo(stash, None)
    else:
        ax = _axis(node.attrs.get("axis", -1), len(s), "LayerNormalization")
        stats = TensorInfo(stash, tuple(d if i < ax else 1 for i, d in enumerate(s)))
    return [_same(ins[0]), stats, stats]


def matmul_shape(a: Shape | None, b: Shape | None) -> Shape | None:
    """numpy.matmul's output shape for symbolic shapes (1-D operands promoted and dropped)."""
    if a is None or b is None:
        return None
    if len(a) == 0 or len(b) == 0:
        raise ShapeError("MatMul operands must have rank ≥ 1")
    a2, b2 = (a if len(a) > 1 else (1,) + tuple(a)), (b if len(b) > 1 else tuple(b) + (1,))
    k1, k2 = a2[-1], b2[-2]
    if isinstance(k1, int) and isinstance(k2, int) and k1 != k2:
        raise ShapeError(f"MatMul: inner dimensions differ ({a} @ {b})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = tuple(batch) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


@rule("MatMul")
def _matmul(node, ins, vals):
    return [TensorInfo(ins[0].dtype, matmul_shape(ins[0].shape, ins[1].shape))]


@rule("MatMulInteger")
def _matmul_integer(node, ins, vals):
    return [TensorInfo(np.int32, matmul_shape(ins[0].shape, ins[1].shape))]


@rule("QLinearMatMul")
def _qlinear_matmul(node, ins, vals):
    return [TensorInfo(ins[7].dtype, matmul_shape(ins[0].shape, ins[3].shape))]


@rule("Gemm")
def _gemm(node, ins, vals):
    a, b = ins[0].shape, ins[1].shape
    if a is None or b is None:
        return [TensorInfo(ins[0].dtype, (None, None))]
    m = a[1] if node.attrs.get("transA", 0) else a[0]
    n = b[0] if node.attrs.get("transB", 0) else b[1]
    return [TensorInfo(ins[0].dtype, (m, n))]


@rule("QuantizeLinear")
def _quantize(node, ins, vals):
    if len(ins) > 2 and ins[2] is not None and ins[2].dtype is not None:
        dtype = ins[2].dtype
    else:
        dtype = node.attrs.get("output_dtype") or np.uint8
    return [_same(ins[0], dtype)]


@rule("DequantizeLinear")
def _dequantize(node, ins, vals):
    return [_same(ins[0], ins[1].dtype)]


@rule("DynamicQuantizeLinear")
def _dynamic_quantize(node, ins, vals):
    return [_same(ins[0], np.uint8), TensorInfo(np.float32, ()), TensorInfo(np.uint8, ())]


@rule("sparseinfer::Dense")
def _dense(node, ins, vals):
    x, w = ins[0].shape, ins[1].shape
    return [TensorInfo(ins[0].dtype, None if x is None or w is None else tuple(x[:-1]) + (w[-1],))]


@rule("sparseinfer::QDense")
def _qdense(node, ins, vals):
    x, w = ins[0].shape, ins[1].shape
    return [TensorInfo(ins[0].dtype, None if x is None or w is None else tuple(x[:-1]) + (w[-1],))]


@rule("sparseinfer::Attention")
def _attention(node, ins, vals):
    q = ins[0].shape
    hidden = node.attrs.get("hidden", 0)
    return [TensorInfo(ins[0].dtype, q if q is None or not hidden else tuple(q[:-1]) + (hidden,))]


@rule("sparseinfer::Embedding")
def _embedding(node, ins, vals):
    # the shape of the sum: every gather term is ids.shape + (table width,); constants broadcast
    shapes, k = [], 2
    for kind in node.attrs["terms"]:
        if kind == "gather":
            t, i = ins[k].shape, ins[k + 1].shape
            shapes.append(None if t is None or i is None else tuple(i) + tuple(t[1:]))
            k += 2
        else:
            shapes.append(ins[k].shape)
            k += 1
    return [TensorInfo(ins[2].dtype, broadcast_shapes(*shapes))]


@rule("sparseinfer::AttentionMaskRow")
def _attention_mask_row(node, ins, vals):
    m = ins[0].shape
    return [TensorInfo(np.float32, None if m is None else (m[0], 1, 1, m[-1]))]


# ------------------------------------------------------------------ driver


def _merge(inferred: TensorInfo, declared: TensorInfo) -> TensorInfo:
    """Prefer what inference proved; keep the model's declared names/sizes where it could not."""
    dtype = inferred.dtype if inferred.dtype is not None else declared.dtype
    if inferred.shape is None:
        return TensorInfo(dtype, declared.shape)
    if declared.shape is None or len(declared.shape) != len(inferred.shape):
        return TensorInfo(dtype, inferred.shape)
    return TensorInfo(dtype, tuple(i if i is not None else d for i, d in zip(inferred.shape, declared.shape)))


def infer_shapes(graph: Graph) -> dict[str, np.ndarray]:
    """Annotate every value of `graph` with its dtype and (symbolic) shape, in place.

    Returns the values it could track for small integer tensors (shape chains), by value name.
    """
    values: dict[str, np.ndarray | None] = {n: _as_value(v.const) for n, v in graph.values.items() if v.is_const}
    for node in graph.nodes:
        ins = [graph.info(n) if n else None for n in node.inputs]
        in_vals = [values.get(n) if n else None for n in node.inputs]
        if node.op == "Constant":
            arr = lookup_version("Constant", node.version).fn(**node.attrs)
            outs = [TensorInfo(arr.dtype, arr.shape)]
        elif any(i is not None and i.dtype is None for i in ins):
            outs = [TensorInfo(None)] * len(node.outputs)  # an unknown dtype upstream: nothing to say
        else:
            fn = _RULES.get(f"{node.domain}::{node.op}" if node.domain else node.op)
            if fn is None:
                raise NotImplementedError(f"no shape rule for op {node.op!r}; add one in graph/shapes.py")
            try:
                outs = fn(node, ins, in_vals)
            except ShapeError as exc:
                raise ShapeError(f"node {node.name or node.op} ({node.op}): {exc}") from None
        for name, info in zip(node.outputs, outs):
            if name:
                graph.set_info(name, _merge(info, graph.info(name)))
        new_vals = _propagate_value(node, in_vals, ins)
        if new_vals:
            for name, v in zip(node.outputs, new_vals):
                if name and v is not None:
                    values[name] = v
    return {k: v for k, v in values.items() if v is not None}


def bind_dims(graph: Graph, input_shapes: dict[str, Shape]) -> Graph:
    """A copy of `graph` with its inputs given (more) concrete shapes and every value re-inferred.

    Symbols bound by the new input shapes (e.g. "batch" → 8) are replaced everywhere, so values
    whose shape the model only declared symbolically become concrete too.
    """
    binding: dict[str, int] = {}
    for name, shape in input_shapes.items():
        old = graph.info(name).shape or ()
        for o, n in zip(old, shape):
            if isinstance(o, str) and isinstance(n, int):
                binding[o] = n
    g = graph.copy()
    for name, value in g.values.items():
        if value.is_const or value.info.shape is None:
            continue
        if name in input_shapes:
            g.set_info(name, TensorInfo(value.info.dtype, tuple(input_shapes[name])))
        elif name not in g.inputs:  # re-derive: forget what the model declared about shapes
            g.set_info(name, TensorInfo(value.info.dtype, tuple(binding.get(d, d) if isinstance(d, str) else d for d in value.info.shape)))
    infer_shapes(g)
    return g
