"""Helpers for pass tests: small ONNX graphs built with onnx.helper, a name-free structural form
of a graph (to compare a pass's result with the Expected graph) and the before/after check on
the NumPy reference executor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sparseinfer.graph import Graph, import_onnx, run_graph
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import Pass, PassContext, Sequential

# fp32 before/after parity for a rewrite (the fused ops compute in float64, the ops they replace in float32)
FP32_RTOL = 1e-5
FP32_ATOL = 1e-5

node = helper.make_node


def onnx_graph(
    nodes: Sequence,
    inputs: Mapping[str, Sequence[int | str]],
    outputs: Sequence[str],
    inits: Mapping[str, np.ndarray] | None = None,
    opset: int = 17,
    input_dtypes: Mapping[str, int] | None = None,
) -> Graph:
    """Build an ONNX model (float32 inputs unless `input_dtypes` says otherwise) and import it.
    Output types and shapes are left to shape inference."""
    dtypes = dict(input_dtypes or {})
    ins = [helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.FLOAT), list(s)) for n, s in inputs.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs]
    initializers = [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()]
    graph = helper.make_graph(list(nodes), "test", ins, outs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return import_onnx(model)


def f32(*values) -> np.ndarray:
    return np.array(values if len(values) != 1 else values[0], np.float32)


def i64(*values) -> np.ndarray:
    return np.array(values if len(values) != 1 else values[0], np.int64)


def bind(graph: Graph, **shapes: Sequence[int]) -> Graph:
    """A copy of `graph` with its inputs' dims bound, as the Engine does before optimising."""
    return bind_dims(graph, {k: tuple(v) for k, v in shapes.items()})


def random_feeds(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a graph whose input shapes are concrete."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        info = graph.info(name)
        assert info.is_static, f"input {name} has no concrete shape: {info}"
        if info.dtype.kind == "f":
            feeds[name] = rng.standard_normal(info.shape).astype(info.dtype)
        else:
            feeds[name] = rng.integers(0, 4, info.shape).astype(info.dtype)
    return feeds


def optimize(graph: Graph, *passes: Pass, ctx: PassContext | None = None) -> Graph:
    """Run `passes` in order (validating after each) on a copy of `graph`; the original stays as it was."""
    after = graph.copy()
    Sequential(list(passes))(after, ctx or PassContext(validate=True))
    return after


def assert_same_outputs(
    before: Graph, after: Graph, feeds: Mapping[str, np.ndarray] | None = None, rtol: float = FP32_RTOL, atol: float = FP32_ATOL
) -> None:
    """Both graphs give the same outputs (same names, dtypes and shapes) on the reference executor."""
    feeds = feeds if feeds is not None else random_feeds(before)
    assert after.inputs == before.inputs and after.outputs == before.outputs
    want, got = run_graph(before, feeds), run_graph(after, feeds)
    for name, w, g in zip(before.outputs, want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{list(g.shape)} after, {w.dtype}{list(w.shape)} before"
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


def _attr(v):
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, tuple(v.reshape(-1).tolist()))
    if isinstance(v, (list, tuple)):
        return tuple(_attr(x) for x in v)
    return repr(v)


def structure(graph: Graph) -> list[tuple]:
    """A name-free description of a graph: per node its op, attributes and where each input comes
    from (a graph input by position, an earlier node's output, or a constant by value), then the
    outputs. Two graphs computing the same thing the same way have equal structures."""
    where = {name: ("input", i) for i, name in enumerate(graph.inputs)}
    rows: list[tuple] = []
    for k, n in enumerate(graph.nodes):
        ins = []
        for i in n.inputs:
            c = graph.const(i) if i else None
            if not i:
                ins.append(None)
            elif c is not None:
                ins.append(("const", c.dtype.str, c.shape, tuple(c.reshape(-1).tolist())))
            else:
                ins.append(where[i])
        for j, o in enumerate(n.outputs):
            where[o] = ("node", k, j)
        rows.append((n.domain, n.op, tuple(sorted((a, _attr(v)) for a, v in n.attrs.items())), tuple(ins)))
    rows.append(("outputs", tuple(where.get(o, ("missing", o)) for o in graph.outputs)))
    return rows


def ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def only(graph: Graph, op: str):
    """The single node of type `op`."""
    found = [n for n in graph.nodes if n.op == op]
    assert len(found) == 1, f"expected one {op}, found {len(found)}:\n{graph}"
    return found[0]
