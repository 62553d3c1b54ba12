"""Shape inference against execution.

The oracles: numpy's own broadcasting and matmul for the dimension algebra, and for whole graphs
the shapes and dtypes of the arrays the NumPy reference executor actually produces (onnxruntime
where the reference itself could be in doubt). Symbolic shapes are checked by substituting the
symbols' values, and `bind_dims` by requiring every shape to become concrete and equal the run.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from sparseinfer.graph import Graph, ReferenceExecutor, ShapeError, TensorInfo, import_onnx, infer_shapes, run_graph
from sparseinfer.graph.shapes import bind_dims, broadcast_shapes, matmul_shape
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
MAX_RANK, MAX_ELEMENTS = 5, 512

GRAPH_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ helpers


def eval_dim(d, binding: dict[str, int]) -> int:
    """A symbolic dim ("batch", "4*batch*sequence") evaluated under `binding`."""
    if isinstance(d, int):
        return d
    return math.prod(int(p) if p.isdigit() else binding[p] for p in d.split("*"))


def execute_every_value(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `graph` on the reference executor and return every node output, by name.

    A copy of the graph gets every value as an extra graph output (through the mutation API)."""
    g = graph.copy()
    for node in g.nodes:
        for out in node.outputs:
            if out and out not in g.outputs:
                g.add_output(out)
    return dict(zip(g.outputs, ReferenceExecutor(g).run(feeds)))


def assert_shapes_match(graph: Graph, executed: dict[str, np.ndarray]) -> None:
    """Every executed value's inferred info is concrete and equals the array's shape and dtype."""
    for name, arr in executed.items():
        info = graph.info(name)
        assert info.shape == arr.shape, f"{name}: inferred {info}, executed {arr.dtype}{list(arr.shape)}\n{graph}"
        assert info.dtype == arr.dtype, f"{name}: inferred {info}, executed {arr.dtype}{list(arr.shape)}"


def assert_symbolic_shapes_consistent(graph: Graph, executed: dict[str, np.ndarray], binding: dict[str, int]) -> None:
    """Wherever symbolic inference claims a rank or a dim, the claim holds for this run."""
    for name, arr in executed.items():
        info = graph.info(name)
        assert info.dtype == arr.dtype, f"{name}: inferred {info}, executed {arr.dtype}"
        if info.shape is None:
            continue
        assert len(info.shape) == arr.ndim, f"{name}: inferred {info}, executed {list(arr.shape)}\n{graph}"
        for i, (d, n) in enumerate(zip(info.shape, arr.shape)):
            if d is not None:
                assert eval_dim(d, binding) == n, f"{name} dim {i}: inferred {info} under {binding}, executed {list(arr.shape)}\n{graph}"


# ------------------------------------------------------------------ broadcasting

dims = st.integers(1, 5)


@st.composite
def broadcastable_shapes(draw, n_min: int = 2, n_max: int = 3, mutate: bool = False):
    """Shapes that mostly broadcast together (with `mutate`, sometimes they do not)."""
    base = draw(st.lists(dims, max_size=4))
    shapes = []
    for _ in range(draw(st.integers(n_min, n_max))):
        rank = draw(st.integers(0, len(base)))
        tail = base[len(base) - rank :]
        shapes.append(tuple(1 if draw(st.booleans()) else d for d in tail))
    if mutate and draw(st.booleans()):
        i = draw(st.integers(0, len(shapes) - 1))
        if shapes[i]:
            j = draw(st.integers(0, len(shapes[i]) - 1))
            shapes[i] = shapes[i][:j] + (draw(st.integers(0, 6)),) + shapes[i][j + 1 :]
    return shapes


def _numpy_broadcast(shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(broadcastable_shapes(n_min=1, mutate=True))
def test_broadcast_shapes_matches_numpy(shapes):
    expected = _numpy_broadcast(shapes)
    if expected is None:
        with pytest.raises(ShapeError):
            broadcast_shapes(*shapes)
    else:
        assert broadcast_shapes(*shapes) == expected


@st.composite
def symbolised(draw, shapes):
    """Replace some dims by symbols; returns (symbolic shapes, binding symbol → size).

    A symbol is shared by every dim of the same size ("n3") or is unique to its dim ("u0_1")."""
    binding: dict[str, int] = {}
    out = []
    for i, s in enumerate(shapes):
        sym_shape = []
        for j, d in enumerate(s):
            kind = draw(st.sampled_from(["int", "shared", "unique"]))
            if kind == "int":
                sym_shape.append(d)
                continue
            name = f"n{d}" if kind == "shared" else f"u{i}_{j}"
            binding[name] = d
            sym_shape.append(name)
        out.append(tuple(sym_shape))
    return out, binding


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_symbolic_broadcast_agrees_with_numpy_after_substitution(data):
    shapes = data.draw(broadcastable_shapes(n_min=1, mutate=True))
    sym_shapes, binding = data.draw(symbolised(shapes))
    expected = _numpy_broadcast(shapes)
    try:
        result = broadcast_shapes(*sym_shapes)
    except ShapeError:
        # Only a real conflict (between known sizes) may be reported.
        assert expected is None
        return
    if expected is None:
        return  # a symbol hid the conflict: nothing is claimed about a run that cannot happen
    assert len(result) == len(expected)
    for d, n in zip(result, expected):
        if d is not None:
            assert eval_dim(d, binding) == n, (sym_shapes, result, expected)


symbols = st.sampled_from(["batch", "sequence", "heads", "s0"])
sym_or_int = st.one_of(dims, symbols)


@given(st.lists(sym_or_int, max_size=4), st.integers(0, 6))
def test_broadcasting_a_symbol_against_ones_keeps_it(shape, n_ones):
    shape = tuple(shape)
    ones = (1,) * n_ones
    expected = (1,) * (n_ones - len(shape)) + shape
    assert broadcast_shapes(shape, ones) == expected
    assert broadcast_shapes(ones, shape) == expected


def test_broadcast_symbol_rules():
    assert broadcast_shapes(("batch", 1, 8), (1, "sequence", 8)) == ("batch", "sequence", 8)
    assert broadcast_shapes(("batch",), (4,)) == (4,)  # a symbol against n > 1 must be n
    assert broadcast_shapes(("batch",), ("sequence",)) == (None,)  # two different symbols: unknown
    assert broadcast_shapes(("batch", 3), None) is None
    with pytest.raises(ShapeError, match="cannot be broadcast"):
        broadcast_shapes(("batch", 3), ("batch", 4))


# ------------------------------------------------------------------ matmul


@st.composite
def matmul_operands(draw):
    """Two shapes of rank 1–4 that usually multiply (batch dims broadcast), sometimes not."""
    ra, rb = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(dims)
    batch = draw(st.lists(dims, max_size=2))

    def operand(rank: int, inner_last: bool):
        if rank == 1:
            return (k,)
        nb = rank - 2
        own = tuple(1 if draw(st.booleans()) else d for d in batch[len(batch) - nb :]) if nb <= len(batch) else None
        if own is None:  # longer than the common batch: extra leading dims broadcast anyway
            own = tuple(draw(st.lists(dims, min_size=nb - len(batch), max_size=nb - len(batch)))) + tuple(batch)
        other = draw(dims)
        return own + ((other, k) if inner_last else (k, other))

    a, b = operand(ra, True), operand(rb, False)
    if draw(st.integers(0, 4)) == 0:  # break something
        which = draw(st.sampled_from("ab"))
        s = list(a if which == "a" else b)
        s[draw(st.integers(0, len(s) - 1))] = draw(st.integers(1, 6))
        a, b = (tuple(s), b) if which == "a" else (a, tuple(s))
    return a, b


@settings(max_examples=300, deadline=None)
@given(matmul_operands())
def test_matmul_shape_matches_numpy(operands):
    a, b = operands
    try:
        expected = np.matmul(np.empty(a, np.float32), np.empty(b, np.float32)).shape
    except ValueError:
        with pytest.raises(ShapeError):
            matmul_shape(a, b)
        return
    assert matmul_shape(a, b) == expected


@settings(max_examples=200, deadline=None)
@given(matmul_operands(), st.data())
def test_symbolic_matmul_agrees_with_numpy_after_substitution(operands, data):
    a, b = operands
    (sa, sb), binding = data.draw(symbolised([a, b]))
    try:
        expected = np.matmul(np.empty(a, np.float32), np.empty(b, np.float32)).shape
    except ValueError:
        expected = None
    try:
        result = matmul_shape(sa, sb)
    except ShapeError:
        assert expected is None
        return
    if expected is not None:
        assert len(result) == len(expected)
        assert all(d is None or eval_dim(d, binding) == n for d, n in zip(result, expected)), (sa, sb, result, expected)


def test_matmul_shape_edge_cases():
    assert matmul_shape(("batch", "sequence", 32), (32, 64)) == ("batch", "sequence", 64)
    assert matmul_shape((3,), (3,)) == ()
    assert matmul_shape(None, (3, 4)) is None
    with pytest.raises(ShapeError):
        matmul_shape((), (3,))
    with pytest.raises(ShapeError, match="inner"):
        matmul_shape((2, 3), (4, 5))


# ------------------------------------------------------------------ random graphs: inference vs execution


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _onnx_slice_len(dim: int, start: int, end: int, step: int) -> int:
    """Length of an ONNX Slice along one axis, from the operator spec's clamping rules
    (which differ from Python's for a negative step and a start before the beginning)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return len(range(start, end, step))


class _ModelBuilder:
    """Builds a random ONNX graph op by op, tracking the concrete shape of each value it makes."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: dict[str, tuple[tuple[int, ...], int, int, int]] = {}  # name → (shape, elem type, low, high)
        self.inits: list[onnx.TensorProto] = []
        self.pool: list[tuple[str, tuple[int, ...]]] = []  # float32 values later ops may read
        self.produced: list[str] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def add_input(self, shape, elem=TensorProto.FLOAT, low: int = 0, high: int = 0) -> str:
        name = self.name("in")
        self.inputs[name] = (tuple(shape), elem, low, high)
        return name

    def add_init(self, array) -> str:
        name = self.name("c")
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def emit(self, op: str, inputs, n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        self.produced += outs
        return outs

    def keep(self, name: str, shape) -> None:
        """Let later ops read a float value, unless it is empty or too big."""
        shape = tuple(shape)
        if 0 not in shape and len(shape) <= MAX_RANK and math.prod(shape) <= MAX_ELEMENTS:
            self.pool.append((name, shape))

    def model(self, input_dims: dict[str, tuple] | None = None) -> onnx.ModelProto:
        """The ONNX model; `input_dims` replaces input shapes (ints or dim_param names)."""
        ins = [helper.make_tensor_value_info(n, elem, (input_dims or {}).get(n, shape)) for n, (shape, elem, _, _) in self.inputs.items()]
        # Outputs declare neither type nor shape: everything the graph knows must come from inference.
        outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in self.produced[-2:]]
        graph = helper.make_graph(self.nodes, "random", ins, outs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return onnx.printer.to_text(self.model())

    def feeds(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for name, (shape, elem, low, high) in self.inputs.items():
            if elem == TensorProto.FLOAT:
                out[name] = rng.standard_normal(shape).astype(np.float32)
            else:
                out[name] = rng.integers(low, high, shape, endpoint=True).astype(np.int64)
        return out


def _operand(draw, b: _ModelBuilder, shape, elem=TensorProto.FLOAT, low: int = 0, high: int = 0) -> str:
    """A new graph input or initializer of `shape` (inputs become symbolic in the symbolic variant)."""
    if draw(st.booleans()):
        return b.add_input(shape, elem, low, high)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if elem == TensorProto.FLOAT:
        return b.add_init(rng.standard_normal(shape).astype(np.float32))
    return b.add_init(rng.integers(low, high, shape, endpoint=True).astype(np.int64))


def _pick(draw, b: _ModelBuilder, ok=lambda s: True):
    choices = [v for v in b.pool if ok(v[1])]
    return draw(st.sampled_from(choices)) if choices else (None, None)


def _axis(draw, rank: int) -> int:
    return draw(st.integers(-rank, rank - 1))


def _partner_shape(draw, s) -> tuple[int, ...]:
    """A shape that broadcasts with `s` (either side may stretch)."""
    rank = draw(st.integers(0, min(len(s) + 1, MAX_RANK)))
    out = []
    for i in range(rank):
        j = len(s) - rank + i
        if j < 0 or s[j] == 1:
            out.append(draw(dims))
        else:
            out.append(draw(st.sampled_from([s[j], 1])))
    return tuple(out)


def _ints(values) -> np.ndarray:
    return np.array(list(values), dtype=np.int64)


def op_binary(draw, b):
    x, s = _pick(draw, b)
    op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Max", "Min", "Greater", "Equal"]))
    mates = [v for v in b.pool if _broadcastable(s, v[1])]
    if mates and draw(st.booleans()):
        y, t = draw(st.sampled_from(mates))
    else:
        t = _partner_shape(draw, s)
        y = _operand(draw, b, t)
    ins = [x, y] if draw(st.booleans()) else [y, x]
    (out,) = b.emit(op, ins)
    if op not in ("Greater", "Equal"):  # bool results are checked but not read further
        b.keep(out, np.broadcast_shapes(s, t))


def _broadcastable(a, b) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def op_reshape(draw, b):
    x, s = _pick(draw, b)
    k = draw(st.integers(0, min(2, len(s))))  # leading dims copied with 0
    rem = math.prod(s[k:])
    tail = []
    for _ in range(draw(st.integers(0, 2))):
        d = draw(st.sampled_from(_divisors(rem)))
        tail.append(d)
        rem //= d
    tail.append(rem)
    out_shape = tuple(s[:k]) + tuple(tail)
    target = [0] * k + tail
    if draw(st.booleans()):
        target[k + draw(st.integers(0, len(tail) - 1))] = -1
    if draw(st.booleans()):
        # As exporters do: the leading dims read at run time, Shape → Slice → Concat.
        (shp,) = b.emit("Shape", [x])
        (lead,) = b.emit("Slice", [shp, b.add_init(_ints([0])), b.add_init(_ints([k]))])
        (tgt,) = b.emit("Concat", [lead, b.add_init(_ints(target[k:]))], axis=0)
    else:
        tgt = b.add_init(_ints(target))
    (out,) = b.emit("Reshape", [x, tgt])
    b.keep(out, out_shape)


def op_transpose(draw, b):
    x, s = _pick(draw, b)
    if s and draw(st.booleans()):
        perm = draw(st.permutations(range(len(s))))
        (out,) = b.emit("Transpose", [x], perm=list(perm))
        b.keep(out, tuple(s[p] for p in perm))
    else:
        (out,) = b.emit("Transpose", [x])
        b.keep(out, tuple(reversed(s)))


def op_unsqueeze(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) < MAX_RANK)
    if x is None:
        return
    n = draw(st.integers(1, min(2, MAX_RANK - len(s))))
    rank = len(s) + n
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=n, max_size=n, unique=True))
    (out,) = b.emit("Unsqueeze", [x, b.add_init(_ints(a - rank if draw(st.booleans()) else a for a in axes))])
    b.keep(out, np.expand_dims(np.empty(s), tuple(axes)).shape)


def op_squeeze(draw, b):
    x, s = _pick(draw, b, lambda s: 1 in s)
    if x is None:
        return
    ones = [i for i, d in enumerate(s) if d == 1]
    if draw(st.integers(0, 3)) == 0:
        (out,) = b.emit("Squeeze", [x])
        b.keep(out, tuple(d for d in s if d != 1))
        return
    axes = draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    (out,) = b.emit("Squeeze", [x, b.add_init(_ints(a - len(s) if draw(st.booleans()) else a for a in axes))])
    b.keep(out, tuple(d for i, d in enumerate(s) if i not in axes))


def op_concat(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    axis = _axis(draw, len(s))
    ins, total = [x], s[axis]
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            ins.append(x)
            total += s[axis]
        else:
            t = list(s)
            t[axis] = draw(dims)
            ins.append(_operand(draw, b, tuple(t)))
            total += t[axis]
    (out,) = b.emit("Concat", ins, axis=axis)
    out_shape = list(s)
    out_shape[axis] = total
    b.keep(out, out_shape)


def op_slice(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    r = len(s)
    if draw(st.booleans()):  # axes omitted: the first n axes, steps 1 (and omitted too)
        n = draw(st.integers(1, r))
        axes, explicit = list(range(n)), False
    else:
        axes = draw(st.lists(st.integers(0, r - 1), min_size=1, max_size=r, unique=True))
        explicit = True
    starts, ends, steps = [], [], []
    for ax in axes:
        d = s[ax]
        # Around the clamping edges: just before/after either end, and the "whole axis" markers.
        bound = st.one_of(st.integers(-2 * d - 2, 2 * d + 2), st.sampled_from([INT64_MIN, INT64_MAX, -d - 1, -d, -1, 0, d - 1, d]))
        starts.append(draw(bound))
        ends.append(draw(bound))
        steps.append(draw(st.sampled_from([1, 1, 2, 3, -1, -2, -3])) if explicit else 1)
    ins = [x, b.add_init(_ints(starts)), b.add_init(_ints(ends))]
    if explicit:
        ins.append(b.add_init(_ints(a - r if draw(st.booleans()) else a for a in axes)))
        if draw(st.booleans()) or any(st_ != 1 for st_ in steps):
            ins.append(b.add_init(_ints(steps)))
    (out,) = b.emit("Slice", ins)
    out_shape = list(s)
    for ax, start, end, step in zip(axes, starts, ends, steps):
        out_shape[ax] = _onnx_slice_len(s[ax], start, end, step)
    b.keep(out, out_shape)


def op_gather(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    axis = _axis(draw, len(s))
    d = s[axis]
    ishape = tuple(draw(st.lists(st.integers(1, 3), max_size=min(2, MAX_RANK + 1 - len(s)))))
    idx = _operand(draw, b, ishape, TensorProto.INT64, -d, d - 1)
    (out,) = b.emit("Gather", [x, idx], axis=axis)
    a = axis % len(s)
    b.keep(out, tuple(s[:a]) + ishape + tuple(s[a + 1 :]))


def op_reduce_mean(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    keep = draw(st.sampled_from([0, 1]))
    if draw(st.integers(0, 3)) == 0:
        axes = list(range(len(s)))
        ins, attrs = [x], {}
    else:
        axes = draw(st.lists(st.integers(0, len(s) - 1), min_size=1, unique=True))
        signed = [a - len(s) if draw(st.booleans()) else a for a in axes]
        if b.opset >= 18:
            ins, attrs = [x, b.add_init(_ints(signed))], {}
        else:
            ins, attrs = [x], {"axes": signed}
    (out,) = b.emit("ReduceMean", ins, keepdims=keep, **attrs)
    b.keep(out, np.mean(np.empty(s), axis=tuple(axes), keepdims=bool(keep)).shape)


def op_matmul(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    x_left = draw(st.booleans())
    k = s[-1] if x_left else (s[-2] if len(s) >= 2 else s[0])
    batch = _partner_shape(draw, tuple(s[:-2]))[len(s) - MAX_RANK :] if len(s) > 2 else tuple(draw(st.lists(dims, max_size=1)))
    if draw(st.integers(0, 2)) == 0:
        t = (k,)
    else:
        t = batch + ((k, draw(dims)) if x_left else (draw(dims), k))
    y = _operand(draw, b, t)
    a, c = (s, t) if x_left else (t, s)
    (out,) = b.emit("MatMul", [x, y] if x_left else [y, x])
    b.keep(out, np.matmul(np.empty(a, np.float32), np.empty(c, np.float32)).shape)


def op_split(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    axis = _axis(draw, len(s))
    d = s[axis]
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(1, d - 1), max_size=2, unique=True))) if d > 1 else []
        sizes = np.diff([0, *cuts, d]).tolist()
        outs = b.emit("Split", [x, b.add_init(_ints(sizes))], n_out=len(sizes), axis=axis)
    else:
        # Equal parts; from op-set 18 the last part may be smaller (never empty here).
        ok = [n for n in range(1, d + 1) if d % n == 0 or (b.opset >= 18 and (n - 1) * -(-d // n) < d)]
        n = draw(st.sampled_from(ok))
        attrs = {"num_outputs": n} if b.opset >= 18 else {}
        outs = b.emit("Split", [x], n_out=n, axis=axis, **attrs)
        chunk = -(-d // n)
        sizes = [min(chunk, d - i * chunk) for i in range(n)]
    for out, size in zip(outs, sizes):
        shape = list(s)
        shape[axis] = size
        b.keep(out, shape)


def op_expand(draw, b):
    x, s = _pick(draw, b)
    t = _partner_shape(draw, s)
    (out,) = b.emit("Expand", [x, b.add_init(_ints(t))])
    b.keep(out, np.broadcast_shapes(s, t))


def op_flatten(draw, b):
    x, s = _pick(draw, b)
    axis = draw(st.integers(-len(s), len(s)))
    (out,) = b.emit("Flatten", [x], axis=axis)
    a = axis + len(s) if axis < 0 else axis
    b.keep(out, (math.prod(s[:a]), math.prod(s[a:])))


def op_softmax(draw, b):
    x, s = _pick(draw, b, lambda s: len(s) >= 1)
    if x is None:
        return
    (out,) = b.emit("Softmax", [x], axis=_axis(draw, len(s)))
    b.keep(out, s)


OPS = [op_binary, op_reshape, op_transpose, op_unsqueeze, op_squeeze, op_concat, op_slice, op_gather, op_reduce_mean, op_matmul,
       op_split, op_expand, op_flatten, op_softmax]  # fmt: skip


@st.composite
def random_models(draw) -> _ModelBuilder:
    b = _ModelBuilder(draw(st.sampled_from([13, 17, 18])))
    for _ in range(draw(st.integers(1, 2))):
        x = b.add_input(draw(st.lists(dims, min_size=1, max_size=4)))
        b.pool.append((x, b.inputs[x][0]))
    for _ in range(draw(st.integers(1, 8))):
        draw(st.sampled_from(OPS))(draw, b)
    assume(b.nodes)
    return b


@GRAPH_SETTINGS
@given(random_models(), st.integers(0, 2**16))
def test_inferred_shapes_equal_executed_shapes(b, seed):
    graph = import_onnx(b.model())
    executed = execute_every_value(graph, b.feeds(seed))
    assert_shapes_match(graph, executed)


@st.composite
def symbolic_inputs(draw, b: _ModelBuilder):
    """Dim names for the builder's inputs: some dims stay ints, others become shared or unique symbols."""
    input_dims, binding = {}, {}
    for i, (name, (shape, _, _, _)) in enumerate(b.inputs.items()):
        out = []
        for j, d in enumerate(shape):
            kind = draw(st.sampled_from(["int", "shared", "unique"]))
            if kind == "int":
                out.append(d)
            else:
                sym = f"n{d}" if kind == "shared" else f"u{i}_{j}"
                binding[sym] = d
                out.append(sym)
        input_dims[name] = tuple(out)
    return input_dims, binding


@GRAPH_SETTINGS
@given(random_models(), st.integers(0, 2**16), st.data())
def test_symbolic_shapes_hold_and_bind_to_executed_shapes(b, seed, data):
    input_dims, binding = data.draw(symbolic_inputs(b))
    graph = import_onnx(b.model(input_dims))
    executed = execute_every_value(graph, b.feeds(seed))
    assert_symbolic_shapes_consistent(graph, executed, binding)
    bound = bind_dims(graph, {name: shape for name, (shape, _, _, _) in b.inputs.items()})
    assert_shapes_match(bound, executed)
    assert graph.info(graph.inputs[0]).shape == input_dims[graph.inputs[0]]  # bind_dims left the original alone


# ------------------------------------------------------------------ regression cases


@pytest.mark.parametrize(
    "start, end, step",
    [(-10, -10, -1), (-10, 2, -1), (10, -10, -1), (-10, 10, 1), (2, -10, -1), (-1, -10, -2), (7, 0, -1), (INT64_MAX, INT64_MIN, -1),
     (0, INT64_MAX, 2), (-3, -1, 1), (3, 1, 1)],
)  # fmt: skip
def test_slice_shape_follows_spec_clamping(start, end, step):
    """A negative step from a start before the beginning clamps the start to 0 (one element), where
    Python's slice would give none; onnxruntime is the outside oracle for the spec's rule."""
    ort = pytest.importorskip("onnxruntime")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", start), ("e", end), ("a", 0), ("st", step))]
    g = helper.make_graph([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])], "slice", [x], [y], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    xs = np.arange(5, dtype=np.float32)
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xs})
    graph = import_onnx(model)
    (actual,) = run_graph(graph, [xs])
    np.testing.assert_array_equal(actual, expected)
    assert graph.info("y").shape == expected.shape


@settings(max_examples=300, deadline=None)
@given(st.lists(dims, min_size=1, max_size=3), st.data())
def test_slice_against_onnxruntime(shape, data):
    """Random Slice parameters: the inferred shape, the reference's values and onnxruntime's agree."""
    ort = pytest.importorskip("onnxruntime")
    b = _ModelBuilder(17)
    x = b.add_input(shape)
    b.pool.append((x, tuple(shape)))
    op_slice(data.draw, b)
    (out,) = b.produced
    feeds = b.feeds(0)
    graph = import_onnx(b.model())
    (actual,) = run_graph(graph, feeds)
    assert graph.info(out).shape == actual.shape

    # onnxruntime reads end = INT64_MAX with a negative step as "to the beginning"; the spec clamps
    # it to dim - 1 (as the reference does), so those cases are not compared with it.
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in b.inits}
    node = b.nodes[-1]
    ends = consts[node.input[2]]
    steps = consts[node.input[4]] if len(node.input) > 4 else np.ones_like(ends)
    if any(e == INT64_MAX and s < 0 for e, s in zip(ends, steps)):
        return
    for_ort = b.model()
    for_ort.ir_version = 8  # what the installed onnxruntime reads
    for_ort.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT  # it wants typed outputs
    (expected,) = ort.InferenceSession(for_ort.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(actual, expected)


def _reshape_by_shape_chain_model() -> onnx.ModelProto:
    """x[batch, 4, sequence, 8] → Reshape(x, [-1, Shape(x)[2], 8]), the target built at run time."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "sequence", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [onnx.numpy_helper.from_array(_ints(v), n) for n, v in (("minus_one", [-1]), ("eight", [8]), ("zero", [0]))]
    inits.append(onnx.numpy_helper.from_array(np.array(2, np.int64), "two"))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "zero"], ["seq1"]),
        helper.make_node("Concat", ["minus_one", "seq1", "eight"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    g = helper.make_graph(nodes, "reshape_chain", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_reshape_minus_one_with_symbols():
    graph = import_onnx(_reshape_by_shape_chain_model())
    assert graph.info("target").shape == (3,)
    assert graph.info("y") == TensorInfo(np.float32, ("4*batch", "sequence", 8))
    bound = bind_dims(graph, {"x": (3, 4, 5, 8)})
    assert bound.info("y").shape == (12, 5, 8)
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 8)).astype(np.float32)
    executed = execute_every_value(graph, {"x": x})
    assert_shapes_match(bound, executed)
    np.testing.assert_array_equal(executed["y"], x.reshape(-1, 5, 8))


# ------------------------------------------------------------------ exporter shape chains on the fixture models


BATCH, SEQUENCE = 2, 7


def _assert_fully_known(graph: Graph) -> None:
    unknown = [f"{n}: {v.info}" for n, v in graph.values.items() if v.info.dtype is None or v.info.shape is None or None in v.info.shape]
    assert not unknown, "values with an unknown dtype, rank or dim:\n" + "\n".join(unknown)


@pytest.mark.parametrize("path", model_ids())
def test_fixture_symbolic_shapes(path):
    entry = manifest_entry(path)
    graph = import_onnx(FIXTURES / entry["path"])
    assert graph.outputs == entry["outputs"]
    for name in graph.outputs:
        assert graph.info(name).shape == tuple(entry["output_shapes"][name])
    _assert_fully_known(graph)

    # The same without the exporter's declarations: inference alone must derive every shape.
    for name, value in graph.values.items():
        if not value.is_const and name not in graph.inputs:
            graph.set_info(name, TensorInfo(None))
    infer_shapes(graph)
    for name in graph.outputs:
        assert graph.info(name).shape == tuple(entry["output_shapes"][name])
    _assert_fully_known(graph)


@pytest.mark.parametrize("path", model_ids())
def test_fixture_shapes_match_execution(path):
    entry = manifest_entry(path)
    graph = import_onnx(FIXTURES / entry["path"])
    executed = execute_every_value(graph, make_inputs(entry, BATCH, SEQUENCE))
    assert_symbolic_shapes_consistent(graph, executed, {"batch": BATCH, "sequence": SEQUENCE})
    bound = bind_dims(graph, {name: (BATCH, SEQUENCE) for name in graph.inputs})
    assert all(v.info.is_static for v in bound.values.values()), [f"{n}: {v.info}" for n, v in bound.values.items() if not v.info.is_static]
    assert_shapes_match(bound, executed)
