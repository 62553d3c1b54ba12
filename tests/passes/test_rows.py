"""hoist_row_gather: a Gather of rows moves above the row-wise ops and an attention's queries; the
graph computes the same outputs (NumPy reference before and after, onnxruntime on fixtures)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.graph import Node, TensorInfo, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.passes import PassContext, fold_constants, fuse_dense, fuse_gelu, fuse_layernorm, hoist_row_gather
from tests.passes.builders import assert_same_outputs, bind, f32, i64, node, onnx_graph, optimize, random_feeds
from tests.passes.test_fusion import ATTENTION_PASSES, D_MODEL, attention_graph
from tests.passes.test_pipeline import SEQ, assert_matches_onnxruntime, optimized

RNG = np.random.default_rng(7)
W = RNG.standard_normal((D_MODEL, D_MODEL)).astype(np.float32)
B = RNG.standard_normal(D_MODEL).astype(np.float32)
ROW_PASSES = (fold_constants, fuse_layernorm, fuse_gelu, fuse_dense)


def with_gather(graph, indices, axis=1, source="y"):
    """`graph` with its output replaced by Gather(source, indices, axis) (a pooler's row)."""
    g = graph.copy()
    idx = g.add_constant(g.fresh_name("idx"), np.asarray(indices, np.int64))
    shape = list(g.info(source).shape)
    ids = np.asarray(indices)
    shape[axis : axis + 1] = [] if ids.ndim == 0 else [ids.size]
    g.add_node(Node("Gather", (source, idx), ("pooled",), {"axis": axis}), [TensorInfo(np.float32, tuple(shape))])
    g.outputs = ["pooled"]
    g.remove_unused()
    return g


def layer_tail(mask="key"):
    """An attention block, then out-projection + residual, LayerNorm, ReLU feed-forward + residual,
    LayerNorm (BERT's layer after the QKV projections), with the attention's input as the residual."""
    g = attention_graph(mask=mask).copy()
    consts = {"t_wo": W, "t_bo": B, "t_g1": B + 1, "t_b1": B, "t_w1": W.T.copy(), "t_bf": B, "t_w2": W, "t_g2": B - 1, "t_b2": B}
    for name, value in consts.items():
        g.add_constant(name, value)
    ln = {"axis": -1, "epsilon": 1e-5}
    for op, ins, out, attrs in [
        ("MatMul", ("y", "t_wo"), "o_mm", {}),
        ("Add", ("o_mm", "t_bo"), "o_b", {}),
        ("Add", ("o_b", "x"), "o_res", {}),
        ("LayerNormalization", ("o_res", "t_g1", "t_b1"), "h1", ln),
        ("MatMul", ("h1", "t_w1"), "f_mm", {}),
        ("Add", ("f_mm", "t_bf"), "f_b", {}),
        ("Relu", ("f_b",), "f_act", {}),
        ("MatMul", ("f_act", "t_w2"), "f2_mm", {}),
        ("Add", ("f2_mm", "h1"), "f2_res", {}),
        ("LayerNormalization", ("f2_res", "t_g2", "t_b2"), "out", ln),
    ]:
        g.add_node(Node(op, ins, (out,), attrs, version=17), [TensorInfo(np.float32, g.info("y").shape)])
    g.outputs = ["out"]
    return optimize(g, *ROW_PASSES, *ATTENTION_PASSES[1:])


@pytest.mark.parametrize("indices", [0, [0], [3, 0], [-1], [1, 1]])
def test_the_gather_moves_to_the_queries_of_the_attention(indices):
    before = with_gather(layer_tail(), indices, source="out")
    after = optimize(before, hoist_row_gather)
    rows = np.asarray(indices).size
    att = next(n for n in after.nodes if n.op == "Attention")
    q, k = after.info(att.inputs[0]).shape, after.info(att.inputs[1]).shape
    assert q[1] == rows and k[1] == 5  # the queries are gathered, the keys are not
    assert after.info(att.outputs[0]).shape[1] == rows
    for n in after.nodes:  # every op after the attention runs on the gathered rows
        if n.op in ("Dense", "LayerNormalization") and after.nodes.index(n) > after.nodes.index(att):
            assert after.info(n.outputs[0]).shape[1] == rows, n
    gathers = [n for n in after.nodes if n.op == "Gather"]
    # one Gather of the layer input (read by the query projection and the first residual), and,
    # for a scalar index, the pooler's own Gather of row 0 of the one row left
    assert [n.inputs[0] for n in gathers][:1] == ["x"] and len(gathers) == (1 if np.ndim(indices) else 2)
    assert_same_outputs(before, after, random_feeds(before, seed=1))


def test_the_layer_input_is_gathered_once_for_both_of_its_readers():
    before = with_gather(layer_tail(), [2], source="out")
    after = optimize(before, hoist_row_gather)
    of_x = [n for n in after.nodes if n.op == "Gather" and n.inputs[0] == "x"]
    assert len(of_x) == 1
    readers = [n for n in after.nodes if of_x[0].outputs[0] in n.inputs]
    assert {n.op for n in readers} == {"Dense"} and len(readers) == 2  # the query projection, the residual
    assert_same_outputs(before, after, random_feeds(before, seed=2))


def test_a_mask_that_varies_by_query_row_keeps_the_gather_below_the_attention():
    before = with_gather(layer_tail(mask="full"), [0], source="out")
    after = optimize(before, hoist_row_gather)
    att = next(n for n in after.nodes if n.op == "Attention")
    assert after.info(att.outputs[0]).shape[1] == 5
    gather = next(n for n in after.nodes if n.op == "Gather" and n.inputs[0] == att.outputs[0])
    assert after.info(gather.outputs[0]).shape[1] == 1
    assert_same_outputs(before, after, random_feeds(before, seed=3))


def elementwise_graph():
    """Add of a broadcast constant [H], Mul of two full inputs, Add of a [B, 1, H] input, Tanh."""
    nodes = [
        node("Add", ["x", "c"], ["a"]),
        node("Mul", ["a", "y"], ["m"]),
        node("Add", ["m", "z"], ["s"]),
        node("Tanh", ["s"], ["t"]),
    ]
    g = onnx_graph(nodes, {"x": ["b", "s", 4], "y": ["b", "s", 4], "z": ["b", 1, 4]}, ["t"], {"c": f32(1, 2, 3, 4)})
    return bind(g, x=(2, 6, 4), y=(2, 6, 4), z=(2, 1, 4))


def test_elementwise_operands_are_gathered_where_they_vary_along_the_axis():
    before = optimize(with_gather(elementwise_graph(), [4, 1], source="t"), fold_constants)
    after = optimize(before, hoist_row_gather)
    gathered = {n.inputs[0] for n in after.nodes if n.op == "Gather"}
    assert gathered == {"x", "y"}  # not the constant, not z (one row, broadcast)
    assert all(after.info(o).shape[1] == 2 for n in after.nodes for o in n.outputs)
    assert_same_outputs(before, after, random_feeds(before, seed=4))


@pytest.mark.parametrize(
    "case",
    ["read_elsewhere", "all_rows", "last_axis", "softmax_over_rows", "graph_output", "twin_outputs"],
)
def test_the_gather_stays_where_moving_it_would_change_the_result_or_save_nothing(case):
    nodes = [node("Tanh", ["x"], ["t"])]
    outputs = ["g"]
    indices, axis = i64([1]), 1
    if case == "read_elsewhere":
        nodes.append(node("Neg", ["t"], ["n"]))
        outputs.append("n")
    elif case == "all_rows":
        indices = i64([2, 1, 0])
    elif case == "last_axis":
        axis = 2
    elif case == "softmax_over_rows":
        nodes = [node("Softmax", ["x"], ["t"], axis=1)]
    elif case == "graph_output":
        outputs.append("t")
    elif case == "twin_outputs":  # two graph outputs, the same rows: each keeps its name
        nodes.append(node("Gather", ["t", "idx"], ["g2"], axis=axis))
        outputs.append("g2")
    nodes.append(node("Gather", ["t", "idx"], ["g"], axis=axis))
    before = bind(onnx_graph(nodes, {"x": ["b", "s", 4]}, outputs, {"idx": indices}), x=(2, 3, 4))
    before = optimize(before, fold_constants)
    after = optimize(before, hoist_row_gather)
    assert [(n.op, n.inputs) for n in after.nodes] == [(n.op, n.inputs) for n in before.nodes]
    assert_same_outputs(before, after, random_feeds(before, seed=5))


def test_pooler_of_a_bert_classifier_narrows_its_last_layer():
    """The fixture's pooler reads token 0: its last layer runs on one row per sequence, the
    earlier layers on all of them, and the outputs still equal onnxruntime's on the file."""
    path = "bert-sequence-classification/model.onnx"
    graph, feeds = optimized(path, PassContext())
    attention = [n for n in graph.nodes if n.op == "Attention"]
    assert [graph.info(a.inputs[0]).shape[1] for a in attention] == [SEQ, 1]  # queries
    assert [graph.info(a.inputs[1]).shape[1] for a in attention] == [SEQ, SEQ]  # keys
    last = graph.nodes.index(attention[-1])
    after = [n for n in graph.nodes[last:] if n.domain == ENGINE_DOMAIN and n.op == "Dense"]
    # attention output, FF1, FF2 on one row; then pooler and classifier on [B, H]
    assert [graph.info(n.outputs[0]).shape[:2] for n in after[:3]] == [(2, 1)] * 3
    assert_matches_onnxruntime(path, graph, feeds)
    full, _ = optimized(path, PassContext(disabled={"hoist_row_gather"}))
    assert [full.info(a.inputs[0]).shape[1] for a in full.nodes if a.op == "Attention"] == [SEQ, SEQ]
    for a, b in zip(run_graph(graph, feeds), run_graph(full, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
