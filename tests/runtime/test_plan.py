"""Plan: lowering an optimised graph to kernel and reference steps, buffer reuse by liveness, the
outputs it hands out, and the Engine's threads and profile on top of it. Oracles: the reference
executor on the same optimised graph, and onnxruntime on the original ONNX model."""

from __future__ import annotations

import functools
import math
import re

import numba
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparseinfer
from sparseinfer import Engine
from sparseinfer.graph import Graph, Node, TensorInfo, import_onnx, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, default_pipeline
from sparseinfer.runtime.plan import Plan
from tests.conftest import FIXTURES, MANIFEST, make_inputs, manifest_entry, model_ids
from tests.tolerances import MODEL_ATOL, MODEL_RTOL, tolerance

BATCH, SEQ = 2, 9
F32_MIN = np.finfo(np.float32).min
PLAN_TOL = tolerance("plan", np.float32)
KERNEL_OPS = {"Dense", "Attention", "LayerNormalization"}
REFERENCE_ACTIVATIONS = {"gelu_tanh"}  # Dense activations without a kernel epilogue


@functools.cache
def planned(path: str) -> tuple[Graph, Plan, dict[str, np.ndarray]]:
    """A fixture bound to (BATCH, SEQ), optimised by the default pipeline and planned."""
    feeds = make_inputs(manifest_entry(path), BATCH, SEQ, seed=3)
    graph = bind_dims(import_onnx(FIXTURES / path), {k: v.shape for k, v in feeds.items()})
    default_pipeline()(graph, PassContext())
    return graph, Plan(graph), feeds


def nbytes(graph: Graph, name: str) -> int:
    info = graph.info(name)
    return math.prod(info.shape) * info.dtype.itemsize


def assert_outputs_close(ours, theirs, tol) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        np.testing.assert_allclose(a, b, **tol)


def onnxruntime_outputs(model: onnx.ModelProto | str, feeds) -> list[np.ndarray]:
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def model(nodes, inputs: dict[str, list], inits: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A float32 ONNX model with output "y" (ir_version 9: what the installed onnxruntime reads)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def optimised(m: onnx.ModelProto) -> Graph:
    graph = import_onnx(m)
    default_pipeline()(graph, PassContext(validate=True))
    return graph


def step_of(plan: Plan, op: str):
    (step,) = [s for s in plan.steps if s.node.op == op]
    return step


# ----------------------------------------------------------------------------- buffers


def kernel_value_lifetimes(plan: Plan, feeds) -> dict[str, tuple[int, int]]:
    """Recomputed here, independently of the plan's own bookkeeping: for every kernel output, the
    step that writes it and the last step that reads it or a view of it (len(steps) when it, or a
    view of it, is a graph output). Reference ops such as Reshape, Squeeze, Split or Slice return
    NumPy views, so a value computed from a kernel buffer may still live in it: which ones do is
    found by running the steps once and asking NumPy whether an output shares memory with an input."""
    arena = plan._new_arena()
    env = dict(plan._consts) | dict(feeds)
    lives_in: dict[str, set[str]] = {}  # value → the kernel outputs whose buffer holds it
    born: dict[str, int] = {}
    for i, step in enumerate(plan.steps):
        step.fn(env, arena)
        for out in filter(None, step.node.outputs):
            if step.kind == "kernel":
                lives_in[out], born[out] = {out}, i
            else:
                sources = [x for x in step.node.inputs if x in lives_in and np.shares_memory(env[out], env[x])]
                lives_in[out] = set().union(*(lives_in[x] for x in sources))
    end = dict(born)
    for i, step in enumerate(plan.steps):
        for x in filter(None, step.node.inputs):
            for v in lives_in.get(x, ()):
                end[v] = max(end[v], i)
    for out in plan.graph.outputs:
        for v in lives_in.get(out, ()):
            end[v] = len(plan.steps)
    return {v: (born[v], end[v]) for v in born}


def assert_no_live_values_share_a_slot(plan: Plan, feeds) -> None:
    slots = plan.buffers.slot_of
    life = kernel_value_lifetimes(plan, feeds)
    for a in life:
        for b in life:
            if a != b and slots[a] == slots[b] and life[a][0] < life[b][0]:
                # b's kernel writes the slot at step life[b][0]: a (and every view of it) must be dead by then
                assert life[a][1] < life[b][0], f"{a} (steps {life[a]}) and {b} (steps {life[b]}) share slot {slots[a]}"


@pytest.mark.parametrize("path", model_ids())
def test_fixture_plan_reuses_buffers_safely_and_matches_the_reference(path):
    graph, plan, feeds = planned(path)
    for step in plan.steps:  # the ops the kernels implement run on them (DistilBERT's ReLU pre-classifier does not)
        if step.node.op in KERNEL_OPS and step.node.attrs.get("activation") not in REFERENCE_ACTIVATIONS:
            assert step.kind == "kernel", step.node

    kernel_outputs = [s.node.outputs[0] for s in plan.steps if s.kind == "kernel"]
    slots = plan.buffers.slot_of
    assert sorted(slots) == sorted(kernel_outputs)
    for name in kernel_outputs:
        assert plan.buffers.slot_bytes[slots[name]] >= nbytes(graph, name), name

    assert_no_live_values_share_a_slot(plan, feeds)

    sizes = [nbytes(graph, name) for name in kernel_outputs]
    assert max(sizes) <= plan.buffers.peak_bytes <= sum(sizes)

    assert_outputs_close(plan.run(feeds), run_graph(graph, feeds), PLAN_TOL)


def test_a_buffer_is_not_reused_while_a_view_of_it_is_still_read():
    """y = Reshape(x @ W1) + Reshape(x @ W2): both Dense outputs are the same size, so the plan wants
    one slot for both; the first Reshape's view must survive the second Dense."""
    rng = np.random.default_rng(10)
    inits = {
        "w1": rng.standard_normal((8, 8)).astype(np.float32),
        "w2": rng.standard_normal((8, 8)).astype(np.float32),
        "shape": np.array([2, 16], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["h1"]),
        node("Reshape", ["h1", "shape"], ["r1"]),
        node("MatMul", ["x", "w2"], ["h2"]),
        node("Reshape", ["h2", "shape"], ["r2"]),
        node("Add", ["r1", "r2"], ["y"]),
    ]
    m = model(nodes, {"x": [4, 8]}, inits)
    plan = Plan(optimised(m))
    assert [(s.node.op, s.kind) for s in plan.steps][::2] == [("Dense", "kernel"), ("Dense", "kernel"), ("Add", "reference")]
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    assert_outputs_close(plan.run(feeds), onnxruntime_outputs(m, feeds), {"atol": MODEL_ATOL, "rtol": MODEL_RTOL})
    assert_no_live_values_share_a_slot(plan, feeds)


# One fixture per architecture and head; the question-answering heads end in Split → Squeeze, whose
# outputs are views of the last Dense's buffer.
_HEADS = [m["path"] for m in MANIFEST if m["path"].endswith("/model.onnx")]


@pytest.mark.parametrize("path", _HEADS)
def test_outputs_handed_out_are_not_overwritten_by_the_next_run(path):
    graph, plan, feeds = planned(path)
    first = plan.run(feeds)
    kept = [a.copy() for a in first]
    second = plan.run(make_inputs(manifest_entry(path), BATCH, SEQ, seed=99))
    assert any(not np.allclose(a, b) for a, b in zip(kept, second))  # the inputs did change the outputs
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("block", "quantize"), [(None, None), ((4, 1), "int8")])
def test_a_reused_arena_gives_each_run_its_own_result(block, quantize):
    """Steps keep the views they derive from their arena's buffers from the first run in it
    (`Arena.derived`: sparse and int8 workspaces, the attention's); a later run in that arena
    with other inputs must compute what a fresh engine computes."""
    path = "bert-sequence-classification/model.onnx"
    model = sparseinfer.prune(FIXTURES / path, sparsity=0.9, block=block)
    engine = Engine(model, quantize=quantize, num_threads=2)
    first, second = (make_inputs(manifest_entry(path), BATCH, SEQ, seed=s) for s in (7, 8))
    kept = [a.copy() for a in engine.run(first)]
    again = engine.run(second)
    (plan,) = engine._plans.values()
    assert plan._arenas.qsize() == 1  # both runs used the one arena
    assert any(not np.array_equal(a, b) for a, b in zip(kept, again))  # the inputs did change the outputs
    for a, b in zip(again, Engine(model, quantize=quantize, num_threads=2).run(second)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(engine.run(first), kept):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- reference fallbacks


def dense_model(activation: str) -> onnx.ModelProto:
    """x @ W + b followed by Relu (a kernel epilogue) or by the tanh-form Gelu (opset 20, which the
    kernel lacks: a reference step)."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.uniform(-1, 1, (12, 20)).astype(np.float32), "b": rng.uniform(-1, 1, 20).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["lin"])]
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["lin"], ["y"]))
        return model(nodes, {"x": [3, 5, 12]}, inits)
    nodes.append(helper.make_node("Gelu", ["lin"], ["y"], approximate="tanh"))
    return model(nodes, {"x": [3, 5, 12]}, inits, opset=20)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_dense_activations_run_as_kernel_or_reference_and_match(activation):
    m = dense_model(activation)
    graph = optimised(m)
    assert graph.op_counts() == {"Dense": 1}
    plan = Plan(graph)
    step = step_of(plan, "Dense")
    expected_kind = "reference" if activation in REFERENCE_ACTIVATIONS else "kernel"
    assert step.node.attrs["activation"] == activation and step.kind == expected_kind
    x = np.random.default_rng(2).uniform(-2, 2, (3, 5, 12)).astype(np.float32)
    ours = plan.run({"x": x})
    assert_outputs_close(ours, run_graph(import_onnx(m), {"x": x}), PLAN_TOL)
    assert_outputs_close(ours, onnxruntime_outputs(m, {"x": x}), {"atol": MODEL_ATOL, "rtol": MODEL_RTOL})


def attention_model(B: int, S: int, H: int, D: int) -> onnx.ModelProto:
    """softmax(Q Kᵀ / sqrt(D) + mask) V with Q, K, V projections and the head split / merge, and the
    additive mask a [B, 1, S, S] graph input: it may differ per query row (a causal mask, say)."""
    rng = np.random.default_rng(4)
    hd = H * D
    inits = {f"w{t}": rng.uniform(-0.5, 0.5, (hd, hd)).astype(np.float32) for t in "qkv"}
    inits |= {f"b{t}": rng.uniform(-0.5, 0.5, hd).astype(np.float32) for t in "qkv"}
    inits |= {
        "split": np.array([B, S, H, D], np.int64),
        "merge": np.array([B, S, hd], np.int64),
        "sqrt_d": np.array(math.sqrt(D), np.float32),
    }
    node = helper.make_node
    nodes = []
    for t in "qkv":
        nodes += [
            node("MatMul", ["x", f"w{t}"], [f"{t}_mm"]),
            node("Add", [f"{t}_mm", f"b{t}"], [f"{t}_lin"]),
            node("Reshape", [f"{t}_lin", "split"], [f"{t}_4d"]),
        ]
    nodes += [
        node("Transpose", ["q_4d"], ["q_h"], perm=[0, 2, 1, 3]),
        node("Transpose", ["k_4d"], ["k_t"], perm=[0, 2, 3, 1]),
        node("Transpose", ["v_4d"], ["v_h"], perm=[0, 2, 1, 3]),
        node("MatMul", ["q_h", "k_t"], ["qk"]),
        node("Div", ["qk", "sqrt_d"], ["scores"]),
        node("Add", ["scores", "mask"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("MatMul", ["probs", "v_h"], ["ctx"]),
        node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_t", "merge"], ["y"]),
    ]
    return model(nodes, {"x": [B, S, hd], "mask": [B, 1, S, S]}, inits)


def test_attention_with_a_mask_varying_per_query_row_runs_on_the_reference():
    B, S, H, D = 2, 7, 2, 5
    m = attention_model(B, S, H, D)
    graph = optimised(m)
    assert graph.op_counts() == {"Attention": 1, "Dense": 1}, graph.op_counts()
    plan = Plan(graph)
    assert step_of(plan, "Attention").kind == "reference" and step_of(plan, "Dense").kind == "kernel"
    rng = np.random.default_rng(5)
    causal = np.triu(np.full((S, S), F32_MIN, np.float32), k=1)
    feeds = {
        "x": rng.standard_normal((B, S, H * D)).astype(np.float32),
        "mask": (causal + rng.uniform(-2, 0, (B, 1, S, S))).astype(np.float32),  # differs per query row
    }
    assert_outputs_close(plan.run(feeds), onnxruntime_outputs(m, feeds), {"atol": MODEL_ATOL, "rtol": MODEL_RTOL})


# ----------------------------------------------------------------------------- lowering bugs


def engine_op_graph(inputs: dict[str, tuple], consts: dict[str, np.ndarray], node: Node, out_shape: tuple) -> Graph:
    g = Graph("lowering")
    for name, shape in inputs.items():
        g.add_input(name, TensorInfo(np.float32, shape))
    for name, value in consts.items():
        g.add_constant(name, value)
    g.add_node(node, [TensorInfo(np.float32, out_shape)])
    g.add_output(node.outputs[0])
    return g


def _attention_with_key_broadcast_mask(S: int) -> tuple[Graph, dict]:
    """An Attention whose additive mask is [B, 1, 1, 1]: one value per batch row, broadcast over
    the keys (the reference broadcasts any mask to [B, H, S, S])."""
    B, hd = 2, 4
    node = Node("Attention", ("q", "q", "q", "mask"), ("y",), {"num_heads": 1, "scale": 0.5}, domain=ENGINE_DOMAIN)
    graph = engine_op_graph({"q": (B, S, hd), "mask": (B, 1, 1, 1)}, {}, node, (B, S, hd))
    rng = np.random.default_rng(6)
    return graph, {"q": rng.standard_normal((B, S, hd)).astype(np.float32), "mask": np.array([0.0, -30.0], np.float32).reshape(B, 1, 1, 1)}


def _dense_with_runtime_bias() -> tuple[Graph, dict]:
    node = Node("Dense", ("x", "w", "b"), ("y",), {"activation": "none"}, domain=ENGINE_DOMAIN)
    w = np.random.default_rng(7).standard_normal((4, 5)).astype(np.float32)
    graph = engine_op_graph({"x": (3, 4), "b": (5,)}, {"w": w}, node, (3, 5))
    return graph, {"x": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.float32)}


def _dense_with_broadcast_residual() -> tuple[Graph, dict]:
    node = Node("Dense", ("x", "w", "", "r"), ("y",), {"activation": "none"}, domain=ENGINE_DOMAIN)
    w = np.random.default_rng(8).standard_normal((4, 5)).astype(np.float32)
    graph = engine_op_graph({"x": (3, 4), "r": (5,)}, {"w": w}, node, (3, 5))
    return graph, {"x": np.ones((3, 4), np.float32), "r": np.arange(5, dtype=np.float32)}


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: _attention_with_key_broadcast_mask(S=2),
            id="attention-mask-B111-wrong",
        ),
        pytest.param(
            lambda: _attention_with_key_broadcast_mask(S=3),
            id="attention-mask-B111-crash",
        ),
        pytest.param(
            _dense_with_runtime_bias,
            id="dense-runtime-bias",
        ),
        pytest.param(
            _dense_with_broadcast_residual,
            id="dense-broadcast-residual",
        ),
    ],
)
def test_plan_lowers_engine_ops_with_broadcast_operands_correctly(make):
    graph, feeds = make()
    assert_outputs_close(Plan(graph).run(feeds), run_graph(graph, feeds), PLAN_TOL)


def test_layernorm_with_a_broadcast_scale_matches_onnxruntime():
    inits = {"s": np.array([2.0], np.float32), "b": np.array([0.5], np.float32)}
    m = model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)], {"x": [3, 8]}, inits)
    x = np.random.default_rng(9).standard_normal((3, 8)).astype(np.float32)
    plan = Plan(optimised(m))
    assert_outputs_close(plan.run({"x": x}), onnxruntime_outputs(m, {"x": x}), {"atol": MODEL_ATOL, "rtol": MODEL_RTOL})


@pytest.mark.parametrize(
    "axis, ids",
    [
        (1, np.array(0, np.int64)),  # the [CLS] row before BERT's pooler: a scalar index drops the axis
        (1, np.array([3, -1, 0], np.int64)),
        (0, np.array([[1, 0], [1, 1]], np.int32)),
        (-1, np.array(-2, np.int64)),
    ],
)
def test_gather_with_constant_indices_runs_on_a_kernel_and_matches_onnxruntime(axis, ids):
    m = model([helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)], {"x": [2, 5, 6]}, {"i": ids})
    x = np.random.default_rng(3).standard_normal((2, 5, 6)).astype(np.float32)
    plan = Plan(optimised(m))
    assert step_of(plan, "Gather").kind == "kernel"
    ours, theirs = plan.run({"x": x}), onnxruntime_outputs(m, {"x": x})
    assert ours[0].shape == theirs[0].shape
    np.testing.assert_array_equal(ours[0], theirs[0])  # a copy: exact


def test_gather_with_an_out_of_range_constant_index_keeps_the_reference_error():
    m = model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], {"x": [2, 5]}, {"i": np.array([5], np.int64)})
    plan = Plan(optimised(m))
    assert step_of(plan, "Gather").kind == "reference"
    with pytest.raises(Exception, match="out of range"):
        plan.run({"x": np.zeros((2, 5), np.float32)})


# ----------------------------------------------------------------------------- static shapes


def test_plan_refuses_a_graph_with_symbolic_dims():
    graph = import_onnx(FIXTURES / "bert-token-classification/model.onnx")  # batch and sequence left open
    with pytest.raises(ValueError, match="no static shape") as err:
        Plan(graph)
    named = re.search(r"value '([^']+)'", str(err.value))
    assert named and named.group(1) in graph.values and not graph.info(named.group(1)).is_static, str(err.value)
    assert "bind the input shapes" in str(err.value)


def test_plan_refuses_a_value_of_unknown_shape():
    g = Graph("unknown")
    g.add_input("x", TensorInfo(np.float32, (2, 3)))
    g.add_node(Node("Relu", ("x",), ("hidden",), version=14))  # output declared without a shape
    g.add_node(Node("Relu", ("hidden",), ("y",), version=14), [TensorInfo(np.float32, (2, 3))])
    g.add_output("y")
    with pytest.raises(ValueError, match="value 'hidden' has no static shape"):
        Plan(g)


# ----------------------------------------------------------------------------- Engine on plans

ENGINE_PATH = "bert-token-classification/model.onnx"


@pytest.fixture
def restore_numba_threads():
    """Engine(num_threads=n).run sets Numba's thread count of the calling thread and leaves it set."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_one_and_two_threads_give_the_same_results(restore_numba_threads):
    feeds = make_inputs(manifest_entry(ENGINE_PATH), 3, 13, seed=4)
    one = Engine(FIXTURES / ENGINE_PATH, num_threads=1).run(feeds)
    two = Engine(FIXTURES / ENGINE_PATH, num_threads=2).run(feeds)
    assert_outputs_close(two, one, PLAN_TOL)
    assert_outputs_close(one, onnxruntime_outputs(str(FIXTURES / ENGINE_PATH), feeds), {"atol": MODEL_ATOL, "rtol": MODEL_RTOL})


def test_more_threads_than_numba_has_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_threads=1000000 exceeds the \d+ threads Numba was started with"):
        Engine(FIXTURES / ENGINE_PATH, num_threads=10**6)


def test_profile_has_one_row_per_step_with_flops():
    engine = Engine(FIXTURES / ENGINE_PATH)
    feeds = make_inputs(manifest_entry(ENGINE_PATH), BATCH, SEQ)
    rows = engine.profile(feeds)
    plan = engine.plan(feeds)
    assert len(rows) == len(plan.steps)
    g = plan.graph
    for row, step in zip(rows, plan.steps):
        assert {"op", "kind", "ms", "flops"} <= set(row)
        assert (row["op"], row["kind"]) == (step.node.op, step.kind)
        assert isinstance(row["ms"], float) and math.isfinite(row["ms"]) and row["ms"] >= 0.0
        if step.node.op == "Dense":
            x, w = step.node.inputs[:2]
            k, n = g.const(w).shape
            assert row["flops"] == 2 * math.prod(g.info(x).shape[:-1]) * k * n
        elif step.node.op == "Attention":
            b, s = g.info(step.node.inputs[0]).shape[:2]
            hidden = g.info(step.node.outputs[0]).shape[-1]
            assert row["flops"] == 4 * b * s * s * hidden  # Q·Kᵀ and P·V, 2 flops per multiply-add
        elif step.kind == "reference":
            assert row["flops"] == 0
    assert sum(r["op"] == "Dense" for r in rows) == g.op_counts()["Dense"]
