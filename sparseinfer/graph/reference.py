"""NumPy semantics of every IR op: the living spec that the Numba kernels are tested against.

Each function follows the ONNX operator specification for the op-set versions it is registered
for (checked against the official ONNX node tests, see tests/graph/test_onnx_node_tests.py).
They favour being obviously right over being fast. `ReferenceExecutor` runs a whole Graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .ir import Graph
from .registry import UnsupportedOpError, lookup_version, register

# --------------------------------------------------------------------------- helpers


def _axis(axis: int, rank: int, op: str = "") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def _axes(axes, rank: int, op: str = "") -> tuple[int, ...]:
    return tuple(sorted(_axis(int(a), rank, op) for a in np.asarray(axes).reshape(-1)))


def _ints(x) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


_INT_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


def _saturate(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype not in _INT_RANGES:
        raise UnsupportedOpError(f"quantization to {dtype} is not supported (int8, uint8, int16, uint16, int32 are)")
    lo, hi = _INT_RANGES[dtype]
    return np.clip(x, lo, hi).astype(dtype)


# --------------------------------------------------------------------------- elementwise


def _unary(name: str, fn, since: int = 1) -> None:
    register(name, since=since)(lambda x: np.asarray(fn(x)).astype(x.dtype, copy=False))


_erf = np.frompyfunc(math.erf, 1, 1)

for _name, _fn in {
    "Abs": np.abs,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Exp": np.exp,
    "Log": np.log,
    "Tanh": np.tanh,
    "Reciprocal": np.reciprocal,
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Sign": np.sign,
    "Sin": np.sin,
    "Cos": np.cos,
    "Relu": lambda x: np.maximum(x, 0),
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64))),
    "Erf": lambda x: _erf(x.astype(np.float64)).astype(np.float64),
}.items():
    _unary(_name, _fn)


@register("Identity")
def identity(x):
    return x


@register("Round", since=11)
def round_(x):
    return np.round(x)  # half to even, as ONNX specifies


@register("IsNaN", since=9)
def isnan(x):
    return np.isnan(x)


@register("IsInf", since=10)
def isinf(x, *, detect_negative=1, detect_positive=1):
    return (np.isneginf(x) & bool(detect_negative)) | (np.isposinf(x) & bool(detect_positive))


@register("Not")
def not_(x):
    return np.logical_not(x)


@register("Gelu", since=20)
def gelu(x, *, approximate="none"):
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    elif approximate == "none":
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)).astype(np.float64))
    else:
        raise ValueError(f"Gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return y.astype(x.dtype)


def _int_div(a, b):
    # ONNX integer division truncates toward zero (C semantics), unlike numpy's floor division.
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(a.dtype)


def _binary(name: str, fn, since: int = 7) -> None:
    register(name, since=since)(lambda a, b: np.asarray(fn(a, b)))


for _name, _fn in {
    "Add": lambda a, b: (a + b).astype(a.dtype, copy=False),
    "Sub": lambda a, b: (a - b).astype(a.dtype, copy=False),
    "Mul": lambda a, b: (a * b).astype(a.dtype, copy=False),
    "Div": lambda a, b: _int_div(a, b) if a.dtype.kind in "iu" else (a / b).astype(a.dtype, copy=False),
    "Equal": np.equal,
    "Less": np.less,
    "Greater": np.greater,
    "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
}.items():
    _binary(_name, _fn)


@register("Pow", since=7)
def pow_(a, b):
    if a.dtype.kind in "iu":
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype) if b.dtype.kind == "f" else b).astype(a.dtype)


@register("Mod", since=10)
def mod(a, b, *, fmod=0):
    # fmod=1: C fmod (sign of the dividend); fmod=0: Python modulo (sign of the divisor).
    return (np.fmod(a, b) if fmod else np.mod(a, b)).astype(a.dtype)


def _variadic(name: str, fn, since: int = 8) -> None:
    def op(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return np.asarray(out).astype(xs[0].dtype, copy=False)

    register(name, since=since)(op)


_variadic("Max", np.maximum, since=8)
_variadic("Min", np.minimum, since=8)
_variadic("Sum", np.add, since=8)


@register("Mean", since=8)
def mean(*xs):
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return (total / len(xs)).astype(xs[0].dtype)


@register("Where", since=9)
def where(cond, x, y):
    return np.where(cond, x, y)


@register("Clip", since=6)
def clip(x, lo=None, hi=None):
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return np.asarray(x)


# --------------------------------------------------------------------------- casts and constants


def _cast_to(x: np.ndarray, to: np.dtype) -> np.ndarray:
    to = np.dtype(to)
    if x.dtype.kind == "f" and to.kind in "iu":
        with np.errstate(invalid="ignore"):  # NaN/Inf → int is undefined in ONNX too
            return np.trunc(x).astype(to)
    if x.dtype.kind in "US" or to.kind in "US":
        return x.astype(to) if to.kind not in "US" else x.astype(str).astype(object)
    return x.astype(to)


@register("Cast", since=6)
def cast(x, *, to, saturate=1):
    return _cast_to(x, to)


@register("CastLike", since=15)
def cast_like(x, target, *, saturate=1):
    return _cast_to(x, target.dtype)


@register("Constant", since=1)
def constant(
    *,
    value=None,
    value_float=None,
    value_floats=None,
    value_int=None,
    value_ints=None,
    value_string=None,
    value_strings=None,
    sparse_value=None,
):
    if sparse_value is not None:
        raise UnsupportedOpError("Constant with a sparse_value is not supported")
    for v, dt in ((value, None), (value_float, np.float32), (value_floats, np.float32), (value_int, np.int64), (value_ints, np.int64)):
        if v is not None:
            return np.array(v, dtype=dt)
    for v in (value_string, value_strings):
        if v is not None:
            return np.array(v, dtype=object)
    raise ValueError("Constant node has no value attribute")


@register("ConstantOfShape", since=9)
def constant_of_shape(shape, *, value=None):
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return np.full(_ints(shape), fill[0], dtype=fill.dtype)


@register("Range", since=11)
def range_(start, limit, delta):
    start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    if delta == 0:
        raise ValueError("Range: delta must not be 0")
    n = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    return (start + np.arange(n, dtype=start.dtype) * delta).astype(start.dtype)


@register("Dropout", since=7)
def dropout_v7(x, *, ratio=0.5, seed=None):
    return x, np.ones(x.shape, dtype=bool)


@register("Dropout", since=12)
def dropout(x, ratio=None, training_mode=None, *, seed=None):
    # Inference only: training_mode=True would need randomness the engine never uses.
    if training_mode is not None and bool(np.asarray(training_mode)):
        raise UnsupportedOpError("Dropout with training_mode=True is not supported (inference engine)")
    return x, np.ones(x.shape, dtype=bool)


# --------------------------------------------------------------------------- shape ops


@register("Shape", since=1)
def shape(x, *, start=0, end=None):
    return np.array(x.shape[slice(start, end)], dtype=np.int64)


@register("Size", since=1)
def size(x):
    return np.array(x.size, dtype=np.int64)


@register("Reshape", since=5)
def reshape(x, shape, *, allowzero=0):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register("Flatten", since=1)
def flatten(x, *, axis=1):
    axis = axis + x.ndim if axis < 0 else axis
    if not 0 <= axis <= x.ndim:
        raise ValueError(f"Flatten: axis {axis} out of range for rank {x.ndim}")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Squeeze", since=1)
def squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim, "Squeeze"))


@register("Unsqueeze", since=1)
def unsqueeze(x, axes=None):
    if axes is None:
        raise ValueError("Unsqueeze needs axes")
    out_rank = x.ndim + np.asarray(axes).size
    return np.expand_dims(x, _axes(axes, out_rank, "Unsqueeze"))


@register("Transpose", since=1)
def transpose(x, *, perm=None):
    return np.transpose(x, perm)


@register("Concat", since=4)
def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


@register("Split", since=2)
def split(x, split=None, *, axis=0, num_outputs=None):
    sizes = split
    axis = _axis(axis, x.ndim, "Split")
    dim = x.shape[axis]
    if sizes is None:
        if not num_outputs:
            raise ValueError("Split needs split sizes or num_outputs")
        chunk = -(-dim // num_outputs)  # the last chunk is smaller when dim does not divide
        sizes = [min(chunk, dim - i * chunk) for i in range(num_outputs)]
    sizes = _ints(sizes)
    if sum(sizes) != dim:
        raise ValueError(f"Split: sizes {sizes} do not add up to dimension {dim}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    """ONNX Slice clamping of (start, end) on an axis of size `dim`; end -1 means "before 0".
    Not Python's rules: with a negative step a start before the beginning clamps to 0."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@register("Slice", since=1)
def slice_(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else [_axis(a, x.ndim, "Slice") for a in _ints(axes)]
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ValueError("Slice: steps must not be 0")
        s, e = slice_bounds(x.shape[ax], s, e, st)
        index[ax] = slice(s, None if e < 0 else e, st)
    return x[tuple(index)]


def _check_indices(indices: np.ndarray, dim: int, op: str) -> np.ndarray:
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        bad = indices[(indices < -dim) | (indices >= dim)].reshape(-1)[0]
        raise IndexError(f"{op}: index {bad} is out of range for an axis of size {dim}")
    return np.where(indices < 0, indices + dim, indices)


@register("Gather", since=1)
def gather(x, indices, *, axis=0):
    axis = _axis(axis, x.ndim, "Gather")
    return np.take(x, _check_indices(np.asarray(indices), x.shape[axis], "Gather"), axis=axis)


@register("GatherElements", since=11)
def gather_elements(x, indices, *, axis=0):
    axis = _axis(axis, x.ndim, "GatherElements")
    return np.take_along_axis(x, _check_indices(indices, x.shape[axis], "GatherElements"), axis=axis)


@register("Expand", since=8)
def expand(x, shape):
    return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(shape)))))


@register("Tile", since=6)
def tile(x, repeats):
    return np.tile(x, _ints(repeats))


@register("Trilu", since=14)
def trilu(x, k=None, *, upper=1):
    k = 0 if k is None else int(np.asarray(k).reshape(()))
    return np.triu(x, k) if upper else np.tril(x, k)


@register("CumSum", since=11)
def cumsum(x, axis, *, exclusive=0, reverse=0):
    ax = _axis(int(np.asarray(axis).reshape(())), x.ndim, "CumSum")
    y = np.flip(x, ax) if reverse else x
    out = np.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=ax)), np.delete(out, -1, axis=ax)], axis=ax)
    return np.flip(out, ax) if reverse else out


# --------------------------------------------------------------------------- reductions


def _reduce(name: str, fn, since: int) -> None:
    def op(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        if axes is None or np.asarray(axes).size == 0:
            if noop_with_empty_axes:
                return x
            axes = tuple(range(x.ndim))
        else:
            axes = _axes(axes, x.ndim, name)
        return np.asarray(fn(x, axis=axes, keepdims=bool(keepdims))).astype(x.dtype, copy=False)

    register(name, since=since)(op)


_reduce("ReduceMean", np.mean, since=1)
_reduce("ReduceSum", np.sum, since=1)


def _identity_of(fn, lowest: bool):
    # Reducing an empty set gives the reduction's identity (ONNX: -inf for max, +inf for min).
    def reduce(x, axis, keepdims):
        if x.size:
            return fn(x, axis=axis, keepdims=keepdims)
        if x.dtype.kind == "b":
            init = not lowest
        elif x.dtype.kind == "f":
            init = -np.inf if lowest else np.inf
        else:
            init = np.iinfo(x.dtype).min if lowest else np.iinfo(x.dtype).max
        return fn(x, axis=axis, keepdims=keepdims, initial=init)

    return reduce


_reduce("ReduceMax", _identity_of(np.max, lowest=True), since=1)
_reduce("ReduceMin", _identity_of(np.min, lowest=False), since=1)
_reduce("ReduceProd", np.prod, since=1)
_reduce("ReduceL2", lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims)), since=1)
_reduce("ReduceSumSquare", lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims), since=1)


def _arg(name: str, fn) -> None:
    def op(x, *, axis=0, keepdims=1, select_last_index=0):
        ax = _axis(axis, x.ndim, name)
        if select_last_index:
            idx = x.shape[ax] - 1 - fn(np.flip(x, ax), axis=ax)
        else:
            idx = fn(x, axis=ax)
        idx = np.asarray(idx, dtype=np.int64)
        return np.expand_dims(idx, ax) if keepdims else idx

    register(name, since=1)(op)


_arg("ArgMax", np.argmax)
_arg("ArgMin", np.argmin)


# --------------------------------------------------------------------------- neural network


def _softmax(x: np.ndarray, axis) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


@register("Softmax", since=1)
def softmax_v1(x, *, axis=1):
    # Before opset 13 the input is coerced to 2-D at `axis` and normalised over the flattened tail.
    ax = _axis(axis, x.ndim, "Softmax")
    flat = x.reshape(math.prod(x.shape[:ax]), -1)
    return _softmax(flat, 1).reshape(x.shape).astype(x.dtype)


@register("Softmax", since=13)
def softmax(x, *, axis=-1):
    return _softmax(x, _axis(axis, x.ndim, "Softmax")).astype(x.dtype)


@register("LogSoftmax", since=1)
def log_softmax_v1(x, *, axis=1):
    ax = _axis(axis, x.ndim, "LogSoftmax")
    flat = x.reshape(math.prod(x.shape[:ax]), -1)
    z = flat - flat.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).reshape(x.shape).astype(x.dtype)


@register("LogSoftmax", since=13)
def log_softmax(x, *, axis=-1):
    ax = _axis(axis, x.ndim, "LogSoftmax")
    z = x - x.max(axis=ax, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=ax, keepdims=True))).astype(x.dtype)


@register("LayerNormalization", since=17)
def layer_normalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    ax = _axis(axis, x.ndim, "LayerNormalization")
    axes = tuple(range(ax, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(axis=axes, keepdims=True) + epsilon)
    y = (x64 - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    stash = np.float32 if stash_type == 1 else x.dtype
    return y.astype(x.dtype), mean.astype(stash), inv_std.astype(stash)


@register("MatMul", since=1)
def matmul(a, b):
    return np.matmul(a, b)


@register("Gemm", since=11)
def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.T if transA else a
    b = b.T if transB else b
    y = alpha * (a @ b)
    if c is not None:
        y = y + beta * c
    return np.asarray(y).astype(a.dtype, copy=False)


# --------------------------------------------------------------------------- quantization


def _per_axis(p: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Reshape a scale or zero point so it broadcasts along `axis` of `x` (1-D = per-axis)."""
    p = np.asarray(p)
    if p.ndim == 0 or p.size == 1 and p.ndim <= 1:
        return p.reshape(())
    if p.ndim == 1:
        shape = [1] * x.ndim
        shape[_axis(axis, x.ndim)] = p.size
        return p.reshape(shape)
    raise UnsupportedOpError("blocked quantization (scale of rank > 1) is not supported")


@register("QuantizeLinear", since=10)
def quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0, output_dtype=0):
    if block_size:
        raise UnsupportedOpError("QuantizeLinear with block_size (blocked quantization) is not supported")
    dtype = np.dtype(y_zero_point.dtype if y_zero_point is not None else (output_dtype or np.uint8))
    zp = 0 if y_zero_point is None else _per_axis(y_zero_point, x, axis).astype(np.float64)
    # Divide in x's own float type as the spec does: float64 would move ties at .5 and change rounding.
    y = np.rint(x / _per_axis(y_scale, x, axis).astype(x.dtype)).astype(np.float64) + zp
    return _saturate(y, dtype)


@register("DequantizeLinear", since=10)
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    if block_size:
        raise UnsupportedOpError("DequantizeLinear with block_size (blocked quantization) is not supported")
    if x.dtype not in _INT_RANGES:
        raise UnsupportedOpError(f"DequantizeLinear of {x.dtype} is not supported")
    zp = 0 if x_zero_point is None else _per_axis(x_zero_point, x, axis).astype(np.int64)
    scale = _per_axis(x_scale, x, axis)
    return ((x.astype(np.int64) - zp) * scale).astype(scale.dtype)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(x):
    # uint8 asymmetric: the range always contains 0 so that 0.0 is exactly representable.
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if scale == 0:
        return np.zeros(x.shape, np.uint8), scale, np.uint8(0)
    zp = _saturate(np.rint(np.float32(0.0 - lo) / scale), np.uint8)
    y = _saturate(np.rint(x.astype(np.float32) / scale) + zp.astype(np.float32), np.uint8)
    return y, np.array(scale, np.float32), np.array(zp, np.uint8)


def _zp_rows(zp, a: np.ndarray) -> np.ndarray | int:
    # A's zero point is a scalar or one per row of A (shape [M] → broadcast over columns).
    if zp is None:
        return 0
    zp = np.asarray(zp).astype(np.int32)
    return zp.reshape(-1, 1) if zp.ndim == 1 and zp.size > 1 else zp.reshape(()) if zp.size == 1 else zp


@register("MatMulInteger", since=10)
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    bzp = 0 if b_zero_point is None else np.asarray(b_zero_point).astype(np.int32)
    return np.matmul(a.astype(np.int32) - _zp_rows(a_zero_point, a), b.astype(np.int32) - bzp).astype(np.int32)


@register("QLinearMatMul", since=10)
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    return requantize(matmul_integer(a, b, a_zero_point, b_zero_point), a_scale, b_scale, y_scale, y_zero_point)


def requantize(acc, a_scale, b_scale, y_scale, y_zero_point) -> np.ndarray:
    """QLinearMatMul's output from its int32 accumulator: sat(rint(acc * a_scale * b_scale / y_scale) + y_zero_point),
    the multiplier in float64 (also what the planner's QLinearMatMul step runs after the int8 kernel)."""
    a_s = np.asarray(a_scale, np.float64)
    a_s = a_s.reshape(-1, 1) if a_s.ndim == 1 and a_s.size > 1 else a_s
    y = np.rint(np.asarray(acc).astype(np.float64) * (a_s * np.asarray(b_scale, np.float64) / np.asarray(y_scale, np.float64)))
    return _saturate(y + np.asarray(y_zero_point).astype(np.float64), y_zero_point.dtype)


# --------------------------------------------------------------------------- fused ops (domain "sparseinfer")
# Produced by the fusion passes, never by exporters. Their semantics are defined here in terms
# of the ONNX ops they replace, which is what the fusion tests check.

ENGINE_DOMAIN = "sparseinfer"
ACTIVATIONS = {
    "none": lambda y: y,
    "gelu": lambda y: 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)).astype(np.float64)),
    "gelu_tanh": lambda y: 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3))),
    "tanh": np.tanh,
    "relu": lambda y: np.maximum(y, 0.0),
}


@register("Dense", domain=ENGINE_DOMAIN)
def dense(x, w, bias=None, residual=None, *, activation="none", layout="dense", block=(), quantize=None):
    """activation(x @ w + bias) + residual, with x [..., K] and a constant w [K, N]. `layout` and
    `block` say how the planner stores w (dense, CSR, BSR) and `quantize` ("int8") that it may run
    the product in int8; the reference is the fp32 semantics and ignores all three."""
    y = np.matmul(x.astype(np.float64), w.astype(np.float64))
    if bias is not None:
        y = y + bias
    y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    return y.astype(x.dtype)


@register("QDense", domain=ENGINE_DOMAIN)
def qdense(x, wq, w_scale, x_scale=None, x_zero_point=None, bias=None, residual=None, *, activation="none"):
    """An int8 matmul with its dequantization, as quantized ONNX files spell it out:

        xq, sx, zx = DynamicQuantizeLinear(x)               (no x_scale: per tensor, dynamic)
                   | QuantizeLinear(x, x_scale, x_zero_point) (static; uint8 zero point)
        y = activation(float32(int32((xq - zx) @ wq)) * (sx * w_scale) + bias) + residual

    `wq` is a constant int8 [K, N] with zero point 0 and `w_scale` float32 [N] (one per output
    column). The integer product is exact; the dequantization is float32 arithmetic in the order
    onnxruntime's dynamic quantization writes it (Cast, then Mul by the float32 product of the two
    scales), then the bias Add in float32; the activation is computed in float64 and rounded."""
    x32 = np.asarray(x, np.float32)
    if x_scale is None:
        xq, sx, zx = dynamic_quantize_linear(x32)
    else:
        sx, zx = np.asarray(x_scale, np.float32).reshape(()), np.asarray(x_zero_point).reshape(())
        if zx.dtype != np.uint8:
            raise ValueError(f"QDense: x_zero_point must be uint8, got {zx.dtype}")
        xq = quantize_linear(x32, sx, zx)
    acc = np.matmul(xq.astype(np.int64) - np.int64(zx), wq.astype(np.int64)).astype(np.int32)
    y = acc.astype(np.float32) * (np.float32(sx) * np.asarray(w_scale, np.float32).reshape(-1))
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(-1)
    if activation != "none":
        y = ACTIVATIONS[activation](y.astype(np.float64)).astype(np.float32)
    if residual is not None:
        y = y + residual
    return y.astype(x.dtype)


@register("Attention", domain=ENGINE_DOMAIN)
def attention(q, k, v, mask=None, *, num_heads, scale, hidden=0, q_offset=0, k_offset=0, v_offset=0, quantize=None):
    """Multi-head scaled dot-product attention. Q, K and V are the `hidden` (= H*D; default: all)
    columns of q, k, v ([B, S, *]) starting at their offsets, so one fused QKV projection can feed
    all three. `mask` is added to the scores and broadcasts to [B, H, S, S]. Returns [B, S, hidden].
    `quantize` ("int8") says the planner may run the two products in int8; the reference is the
    fp32 semantics and ignores it (as `dense` ignores its `quantize`)."""
    hd = hidden or q.shape[-1]
    b, s = q.shape[:2]
    d = hd // num_heads

    def heads(t, offset):
        t = t[..., offset : offset + hd].astype(np.float64)
        return t.reshape(b, t.shape[1], num_heads, d).transpose(0, 2, 1, 3)

    scores = heads(q, q_offset) @ heads(k, k_offset).transpose(0, 1, 3, 2) * scale
    if mask is not None:
        scores = scores + mask
    probs = _softmax(scores, -1)
    return (probs @ heads(v, v_offset)).transpose(0, 2, 1, 3).reshape(b, s, hd).astype(q.dtype)


@register("Embedding", domain=ENGINE_DOMAIN)
def embedding(scale, bias, *operands, terms, epsilon=1e-5):
    """LayerNormalization(axis=-1, epsilon) of a sum of terms, added left to right in the input
    dtype as the Add chain it replaces: `terms[i]` is "gather" (operands: a table and its indices,
    ONNX Gather on axis 0) or "add" (one operand, broadcast to the sum's shape)."""
    operands = list(operands)
    total = None
    for kind in terms:
        if kind == "gather":
            table, ids = operands.pop(0), operands.pop(0)
            term = gather(table, ids)
        elif kind == "add":
            term = operands.pop(0)
        else:
            raise ValueError(f"Embedding: unknown term kind {kind!r} (expected 'gather' or 'add')")
        total = term if total is None else total + term
    if operands or total is None:
        raise ValueError(f"Embedding: terms {list(terms)} do not match the {len(operands)} operands left over")
    return layer_normalization(total, scale, bias, axis=-1, epsilon=epsilon)[0]


@register("AttentionMaskRow", domain=ENGINE_DOMAIN)
def attention_mask_row(mask, *, mode="mul", value=-3.4028234663852886e38):
    """The additive attention mask row [B, 1, 1, S] from an integer padding mask [B, S], as
    exporters compute it in float32 from d = 1 - Cast(mask): "mul" is d * value (eager
    attention), "where" is Where(Cast(d, bool), value, d) (SDPA exports)."""
    d = np.float32(1.0) - np.asarray(mask).astype(np.float32)
    v = np.float32(value)
    if mode == "where":
        y = np.where(d != 0, v, d)
    elif mode == "mul":
        y = d * v
    else:
        raise ValueError(f"AttentionMaskRow: unknown mode {mode!r} (expected 'mul' or 'where')")
    return y.astype(np.float32).reshape(d.shape[0], 1, 1, d.shape[-1])


# --------------------------------------------------------------------------- the executor


class ReferenceExecutor:
    """Runs a Graph op by op with the functions above. Slow and simple; it is the spec."""

    def __init__(self, graph: Graph) -> None:
        graph.validate()
        self.graph = graph
        self._steps = []
        last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for name in node.inputs:
                last_use[name] = i
        for i, node in enumerate(graph.nodes):
            opdef = lookup_version(node.op, node.version, node.domain)
            frees = tuple(n for n in set(node.inputs) if n and last_use.get(n) == i and n not in graph.outputs)
            self._steps.append((node, opdef.fn, frees))
        self._consts = {n: v.const for n, v in graph.values.items() if v.is_const}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds by input name → outputs in graph-output order. Feeds are trusted (the Engine checks)."""
        env: dict[str, np.ndarray] = dict(self._consts)
        env.update(feeds)
        for node, fn, frees in self._steps:
            args = [env[name] if name else None for name in node.inputs]
            try:
                result = fn(*args, **node.attrs)
            except (UnsupportedOpError, IndexError) as exc:
                raise type(exc)(f"node {node.name or node.op}: {exc}") from exc
            if not isinstance(result, tuple):
                result = (result,)
            for name, arr in zip(node.outputs, result):
                if name:
                    env[name] = np.asarray(arr)
            for name in frees:
                if name not in self._consts:
                    env.pop(name, None)
        return [env[name] for name in self.graph.outputs]


def run_graph(graph: Graph, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Convenience: run `graph` once on the reference executor."""
    if not isinstance(feeds, Mapping):
        feeds = dict(zip(graph.inputs, feeds))
    return ReferenceExecutor(graph).run(feeds)
