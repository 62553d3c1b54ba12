"""Cleanup passes: constant folding, no-op elimination, dead-code elimination.

Each case builds a Before graph with onnx.helper, runs the pass, compares the result with an
Expected graph built the same way (by structure: ops, attributes, where each input comes from,
constants by value) and runs Before and After on the reference executor: outputs must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from sparseinfer.passes import PassContext, cleanup, eliminate_dead_code, eliminate_noops, fold_constants
from tests.passes.builders import assert_same_outputs, bind, f32, i64, node, onnx_graph, ops, optimize, random_feeds, structure

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0


def assert_exact_outputs(before, after, feeds=None):
    """Cleanup passes compute nothing new: outputs must be bit-identical."""
    assert_same_outputs(before, after, feeds, rtol=0, atol=0)


# ----------------------------------------------------------------------------- fold_constants


def shape_chain_graph():
    """The TorchScript head split: the Reshape target is computed from Shape(x) at run time."""
    nodes = [
        node("Shape", ["x"], ["shape"]),
        node("Gather", ["shape", "zero"], ["b0"], axis=0),
        node("Gather", ["shape", "one"], ["s0"], axis=0),
        node("Unsqueeze", ["b0", "axes0"], ["b1"]),
        node("Unsqueeze", ["s0", "axes0"], ["s1"]),
        node("Concat", ["b1", "s1", "two", "four"], ["target"], axis=0),
        node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"zero": i64(0), "one": i64(1), "axes0": i64([0]), "two": i64([2]), "four": i64([4])}
    return onnx_graph(nodes, {"x": ["batch", "seq", 8]}, ["y"], inits)


def test_fold_shape_chain_once_dims_are_bound():
    before = bind(shape_chain_graph(), x=(2, 3, 8))
    folded = optimize(before, fold_constants)
    assert ops(folded) == ["Reshape"]  # every shape node became a constant
    after = optimize(folded, eliminate_dead_code)

    expected = bind(
        onnx_graph([node("Reshape", ["x", "target"], ["y"])], {"x": ["batch", "seq", 8]}, ["y"], {"target": i64([2, 3, 2, 4])}), x=(2, 3, 8)
    )
    assert structure(after) == structure(expected)
    assert set(after.values) == {"x", "y", "target"}  # the chain's constants are gone too
    assert after.info("y").shape == (2, 3, 2, 4)
    assert_exact_outputs(before, after)


def test_fold_leaves_a_shape_chain_on_symbolic_dims_alone():
    before = shape_chain_graph()
    after = optimize(before, fold_constants, eliminate_dead_code)
    assert structure(after) == structure(before)
    bound = bind(before, x=(2, 3, 8))
    assert_exact_outputs(bound, bind(after, x=(2, 3, 8)))


def test_fold_evaluates_constant_only_subgraphs():
    """Transpose(W) * 2 and a Constant node feeding MatMul: all folded into one weight."""
    nodes = [
        node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        node("Constant", [], ["two"], value_float=2.0),
        node("Mul", ["wt", "two"], ["w2"]),
        node("MatMul", ["x", "w2"], ["y"]),
    ]
    before = onnx_graph(nodes, {"x": [2, 4]}, ["y"], {"w": W.T.copy()})
    after = optimize(before, fold_constants, eliminate_dead_code)

    expected = onnx_graph([node("MatMul", ["x", "w2"], ["y"])], {"x": [2, 4]}, ["y"], {"w2": W * 2})
    assert structure(after) == structure(expected)
    assert_exact_outputs(before, after)


def test_fold_never_replaces_a_graph_output():
    """An output computed from constants alone keeps its node (a graph output is never a constant);
    what feeds it is folded."""
    nodes = [
        node("Mul", ["w", "half"], ["wh"]),
        node("Transpose", ["wh"], ["wt"], perm=[1, 0]),  # graph output
        node("Shape", ["x"], ["x_shape"]),  # graph output, known once bound
        node("Relu", ["x"], ["y"]),
    ]
    before = bind(onnx_graph(nodes, {"x": ["batch", 4]}, ["wt", "x_shape", "y"], {"w": W, "half": f32(0.5)}), x=(2, 4))
    after = optimize(before, fold_constants, eliminate_dead_code)

    assert ops(after) == ["Transpose", "Shape", "Relu"]
    np.testing.assert_array_equal(after.const(after.nodes[0].inputs[0]), W * 0.5)
    assert all(after.const(o) is None for o in after.outputs)
    assert_exact_outputs(before, after)


@pytest.mark.parametrize("rows, folded", [(3, True), (4, False)], ids=["at-limit", "over-limit"])
def test_fold_limit(monkeypatch, rows, folded):
    """A result with more than FOLD_LIMIT elements stays a node (it would cost memory, not time)."""
    monkeypatch.setattr(cleanup, "FOLD_LIMIT", 12)
    w = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    nodes = [node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"])]
    before = onnx_graph(nodes, {"x": [2, 4]}, ["y"], {"w": w})
    after = optimize(before, fold_constants, eliminate_dead_code)
    assert ops(after) == (["MatMul"] if folded else ["Transpose", "MatMul"])
    assert_exact_outputs(before, after)


def test_fold_limit_default_is_large():
    assert cleanup.FOLD_LIMIT == 1 << 24


def test_fold_counts_the_nodes_it_folded():
    before = bind(shape_chain_graph(), x=(2, 3, 8))
    ctx = PassContext()
    g = before.copy()
    assert fold_constants.run(g, ctx) == 6  # Shape, 2 Gather, 2 Unsqueeze, Concat
    assert fold_constants.run(g, ctx) == 0  # nothing left to do


# ----------------------------------------------------------------------------- eliminate_noops

NOOPS = {
    "Identity": ([node("Identity", ["r"], ["n"])], {}),
    "Cast-same-dtype": ([node("Cast", ["r"], ["n"], to=TensorProto.FLOAT)], {}),
    "Reshape-same-shape": ([node("Reshape", ["r", "shape"], ["n"])], {"shape": i64([2, 3, 4])}),
    "Reshape-same-shape-with-minus-one": ([node("Reshape", ["r", "shape"], ["n"])], {"shape": i64([2, -1, 4])}),
    "Transpose-identity": ([node("Transpose", ["r"], ["n"], perm=[0, 1, 2])], {}),
    "Dropout-one-output": ([node("Dropout", ["r"], ["n"])], {}),
    "Dropout-unused-mask": ([node("Dropout", ["r", "ratio"], ["n", "mask"])], {"ratio": f32(0.1)}),
    "Dropout-training-false": ([node("Dropout", ["r", "ratio", "train"], ["n"])], {"ratio": f32(0.1), "train": np.array(False)}),
    "Unsqueeze-then-Squeeze": (
        [node("Unsqueeze", ["r", "ax"], ["u"]), node("Squeeze", ["u", "ax"], ["n"])],
        {"ax": i64([0])},
    ),
}


@pytest.mark.parametrize("case", list(NOOPS))
def test_noop_is_removed(case):
    """x → Relu → noop → Neg: the noop goes and Neg reads the Relu."""
    noop_nodes, inits = NOOPS[case]
    nodes = [node("Relu", ["x"], ["r"]), *noop_nodes, node("Neg", ["n"], ["y"])]
    before = onnx_graph(nodes, {"x": [2, 3, 4]}, ["y"], inits)
    after = optimize(before, eliminate_noops, eliminate_dead_code)

    expected = onnx_graph([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])], {"x": [2, 3, 4]}, ["y"])
    if case != "Unsqueeze-then-Squeeze":
        assert structure(after) == structure(expected)
    else:  # each alone changes the shape: neither is a noop
        assert ops(after) == ["Relu", "Unsqueeze", "Squeeze", "Neg"]
    assert_exact_outputs(before, after)


def test_chained_noops_are_all_removed():
    nodes = [
        node("Relu", ["x"], ["r"]),
        node("Identity", ["r"], ["a"]),
        node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
        node("Dropout", ["b"], ["c"]),
        node("Add", ["c", "a"], ["y"]),
    ]
    before = onnx_graph(nodes, {"x": [2, 3]}, ["y"])
    after = optimize(before, eliminate_noops, eliminate_dead_code)
    expected = onnx_graph([node("Relu", ["x"], ["r"]), node("Add", ["r", "r"], ["y"])], {"x": [2, 3]}, ["y"])
    assert structure(after) == structure(expected)
    assert_exact_outputs(before, after)


KEPT = {
    "Cast-other-dtype": ([node("Cast", ["r"], ["c"], to=TensorProto.DOUBLE), node("Cast", ["c"], ["n"], to=TensorProto.FLOAT)], {}),
    "Reshape-other-shape": ([node("Reshape", ["r", "shape"], ["n"])], {"shape": i64([6, 4])}),
    "Transpose-permuting": ([node("Transpose", ["r"], ["n"], perm=[1, 0, 2])], {}),
    "Transpose-default-reverses": ([node("Transpose", ["r"], ["n"])], {}),
    "Dropout-mask-used": (
        [
            node("Dropout", ["r", "ratio"], ["n0", "mask"]),
            node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
            node("Mul", ["n0", "m"], ["n"]),
        ],
        {"ratio": f32(0.1)},
    ),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_op_that_changes_its_input_is_kept(case):
    kept, inits = KEPT[case]
    before = onnx_graph([node("Relu", ["x"], ["r"]), *kept, node("Neg", ["n"], ["y"])], {"x": [2, 3, 4]}, ["y"], inits)
    after = optimize(before, eliminate_noops, eliminate_dead_code)
    assert structure(after) == structure(before)
    assert_exact_outputs(before, after)


@pytest.mark.parametrize("op", ["Identity", "Dropout"])
def test_noop_whose_output_is_a_graph_output_is_kept(op):
    """A graph output keeps its name, so the node that writes it stays."""
    before = onnx_graph([node("Relu", ["x"], ["r"]), node(op, ["r"], ["y"])], {"x": [2, 3]}, ["y"])
    after = optimize(before, eliminate_noops, eliminate_dead_code)
    assert structure(after) == structure(before)
    assert after.outputs == ["y"]
    assert_exact_outputs(before, after)


def test_dropout_whose_mask_is_a_graph_output_is_kept():
    before = onnx_graph(
        [node("Relu", ["x"], ["r"]), node("Dropout", ["r"], ["d", "mask"]), node("Neg", ["d"], ["y"])], {"x": [2, 3]}, ["y", "mask"]
    )
    after = optimize(before, eliminate_noops, eliminate_dead_code)
    assert "Dropout" in ops(after)
    assert_exact_outputs(before, after)


def test_noop_reading_a_graph_input_or_constant():
    """The rewired readers may read a graph input or a constant directly."""
    nodes = [node("Identity", ["x"], ["a"]), node("Identity", ["c"], ["b"]), node("Add", ["a", "b"], ["y"])]
    before = onnx_graph(nodes, {"x": [3]}, ["y"], {"c": f32([1.0, 2.0, 3.0])})
    after = optimize(before, eliminate_noops, eliminate_dead_code)
    expected = onnx_graph([node("Add", ["x", "c"], ["y"])], {"x": [3]}, ["y"], {"c": f32([1.0, 2.0, 3.0])})
    assert structure(after) == structure(expected)
    assert_exact_outputs(before, after)


# ----------------------------------------------------------------------------- eliminate_dead_code


def test_dead_code_drops_unused_nodes_and_constants():
    nodes = [
        node("Mul", ["x", "w"], ["m"]),
        node("Exp", ["m"], ["dead1"]),  # nothing reads it
        node("Add", ["dead1", "unused_c"], ["dead2"]),  # nor this
        node("Split", ["m"], ["s0", "s1"], axis=1, num_outputs=2),  # one output read: kept
        node("Relu", ["s0"], ["y"]),
    ]
    inits = {"w": f32([1.0, 2.0, 3.0, 4.0]), "unused_c": f32(3.0), "never_read": f32([9.0])}
    before = onnx_graph(nodes, {"x": [2, 4], "spare": [1]}, ["y"], inits, opset=18)
    ctx = PassContext(validate=True)
    after = before.copy()
    assert eliminate_dead_code.run(after, ctx) == 2

    expected_nodes = [
        node("Mul", ["x", "w"], ["m"]),
        node("Split", ["m"], ["s0", "s1"], axis=1, num_outputs=2),
        node("Relu", ["s0"], ["y"]),
    ]
    expected = onnx_graph(expected_nodes, {"x": [2, 4], "spare": [1]}, ["y"], {"w": inits["w"]}, opset=18)
    assert structure(after) == structure(expected)
    assert "unused_c" not in after.values and "never_read" not in after.values and "dead1" not in after.values
    assert after.inputs == ["x", "spare"]  # graph inputs stay even when unread
    assert_exact_outputs(before, after)


def test_dead_code_keeps_everything_an_output_needs():
    nodes = [node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"]), node("Abs", ["r"], ["z"])]
    before = onnx_graph(nodes, {"x": [2, 2]}, ["y", "z"])
    after = optimize(before, eliminate_dead_code)
    assert structure(after) == structure(before)
    assert_exact_outputs(before, after)


def test_cleanup_passes_run_at_opt_level_one_and_zero():
    """fold_constants and eliminate_noops are opt_level 1, dead-code elimination 0 (always)."""
    assert (fold_constants.opt_level, eliminate_noops.opt_level, eliminate_dead_code.opt_level) == (1, 1, 0)


def test_all_cleanups_together_on_random_inputs():
    """The three passes in pipeline order on a graph mixing every case above."""
    nodes = [
        node("Shape", ["x"], ["shape"]),
        node("Gather", ["shape", "zero"], ["b0"], axis=0),
        node("Unsqueeze", ["b0", "axes0"], ["b1"]),
        node("Concat", ["b1", "minus_one"], ["target"], axis=0),
        node("Reshape", ["x", "target"], ["flat"]),
        node("Identity", ["flat"], ["flat_id"]),
        node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        node("MatMul", ["flat_id", "wt"], ["mm"]),
        node("Dropout", ["mm"], ["y"]),
        node("Sigmoid", ["mm"], ["unused"]),
    ]
    inits = {"zero": i64(0), "axes0": i64([0]), "minus_one": i64([-1]), "w": np.ones((5, 12), np.float32)}
    before = bind(onnx_graph(nodes, {"x": ["batch", 3, 4]}, ["y"], inits), x=(2, 3, 4))
    after = optimize(before, fold_constants, eliminate_noops, eliminate_dead_code)
    assert ops(after) == ["Reshape", "MatMul", "Dropout"]
    assert_exact_outputs(before, after, random_feeds(before, seed=5))
