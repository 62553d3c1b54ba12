"""The Graph mutation API and `validate`.

Edits that should not change what a graph computes are checked the way pass tests are: run the
graph before and after on the NumPy reference executor and require identical outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from sparseinfer.graph import Graph, GraphError, Node, TensorInfo, import_onnx, run_graph
from sparseinfer.graph.registry import lookup

F32 = np.dtype(np.float32)


def _node(op: str, inputs, outputs, **attrs) -> Node:
    """A node following the newest semantics of `op` at op-set 17, as the importer would make it."""
    return Node(op, tuple(inputs), tuple(outputs), attrs, version=lookup(op, 17).since)


def small_graph() -> Graph:
    """x[batch, 4] → y = x * w → z = Relu(y) → out = z - x (output), plus a dead branch."""
    g = Graph("small", 17)
    info = TensorInfo(F32, ("batch", 4))
    g.add_input("x", info)
    g.add_constant("w", np.array([2.0, -1.0, 0.5, 3.0], np.float32))
    g.add_constant("unused_c", np.ones(3, np.float32))
    g.add_node(_node("Mul", ["x", "w"], ["y"]), [info])
    g.add_node(_node("Relu", ["y"], ["z"]), [info])
    g.add_node(_node("Sub", ["z", "x"], ["out"]), [info])
    g.add_node(_node("Neg", ["y"], ["dead1"]), [info])
    g.add_node(_node("Abs", ["dead1"], ["dead2"]), [info])
    g.add_output("out")
    return g


def _x(batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)


def _run(g: Graph, x: np.ndarray) -> list[np.ndarray]:
    return run_graph(g, {"x": x})


def _assert_same_outputs(a: Graph, b: Graph, x: np.ndarray) -> None:
    for u, v in zip(_run(a, x), _run(b, x), strict=True):
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------ Node and TensorInfo


def test_node_replace_returns_a_new_node():
    n = _node("Mul", ["a", "b"], ["c"])
    m = n.replace(inputs=("a", "a"), name="square")
    assert m is not n
    assert (m.op, m.inputs, m.outputs, m.name) == ("Mul", ("a", "a"), ("c",), "square")
    assert (n.inputs, n.name) == (("a", "b"), "")  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.op = "Add"


def test_node_normalises_and_owns_its_fields():
    attrs = {"axis": 1}
    n = Node("Softmax", ["x"], ["y"], attrs)
    assert n.inputs == ("x",) and n.outputs == ("y",)
    attrs["axis"] = 0
    assert n.attrs == {"axis": 1}  # a copy, not the caller's dict
    assert str(n) == "y = Softmax(x) axis=1"


def test_tensor_info():
    info = TensorInfo("float32", ["batch", 4])
    assert info.dtype == F32 and info.shape == ("batch", 4) and info.rank == 2
    assert not info.is_static and TensorInfo(F32, (2, 4)).is_static
    assert TensorInfo(F32).rank is None and not TensorInfo(F32).is_static
    assert str(TensorInfo(F32, (None, 3))) == "float32[?, 3]"


# ------------------------------------------------------------------ reading


def test_producer_consumers_and_counts():
    g = small_graph()
    assert g.producer("y").op == "Mul"
    assert g.producer("x") is None
    assert [n.op for n in g.consumers("y")] == ["Relu", "Neg"]
    assert g.op_counts() == {"Abs": 1, "Mul": 1, "Neg": 1, "Relu": 1, "Sub": 1}
    assert len(g) == 5 and [n.op for n in g] == [n.op for n in g.nodes]
    assert g.const("w") is not None and g.const("x") is None and g.const("nope") is None
    with pytest.raises(GraphError, match="'nope'"):
        g.value("nope")


def test_nodes_cannot_be_edited_from_outside():
    g = small_graph()
    assert isinstance(g.nodes, tuple)
    with pytest.raises(AttributeError):
        g.nodes.append(_node("Neg", ["x"], ["q"]))


# ------------------------------------------------------------------ building


def test_add_node_declares_outputs_and_can_insert():
    g = small_graph()
    n = g.add_node(_node("Neg", ["x"], ["nx"]))
    assert g.nodes[-1] is n
    assert g.info("nx") == TensorInfo(None)  # no infos: unknown until shape inference
    first = g.add_node(_node("Abs", ["x"], ["ax"]), [TensorInfo(F32, ("batch", 4))], index=0)
    assert g.nodes[0] is first and g.info("ax").shape == ("batch", 4)
    g.validate()


def test_add_node_refuses_duplicates_and_bad_infos():
    g = small_graph()
    with pytest.raises(GraphError, match="'y'.*defined twice"):
        g.add_node(_node("Neg", ["x"], ["y"]))
    with pytest.raises(GraphError, match="2 infos"):
        g.add_node(_node("Neg", ["x"], ["q"]), [TensorInfo(F32), TensorInfo(F32)])
    with pytest.raises(GraphError, match="defined twice"):
        g.add_constant("w", np.zeros(1))
    with pytest.raises(GraphError, match="'missing'"):
        g.add_output("missing")


def test_fresh_name():
    g = small_graph()
    g.add_constant("t__1", np.zeros(1))  # a name that looks like a generated one
    names = [g.fresh_name("t") for _ in range(5)]
    assert len(set(names)) == 5
    assert all(n.startswith("t") and n not in g.values for n in names)
    assert "t__1" not in names


def test_remove_node_forgets_outputs_but_keeps_graph_outputs():
    g = small_graph()
    abs_node = g.producer("dead2")
    g.remove_node(abs_node)
    assert abs_node not in g.nodes and "dead2" not in g.values
    sub = g.producer("out")
    g.remove_node(sub)
    assert "out" in g.values  # still a graph output: its value stays (validate will complain)
    with pytest.raises(GraphError, match="'out'"):
        g.validate()


def test_replace_node_with_several_nodes_keeps_the_output_and_the_result():
    g = small_graph()
    before = g.copy()
    sub = g.producer("out")
    t = g.fresh_name("neg_x")
    g.replace_node(sub, [_node("Neg", ["x"], [t]), _node("Add", ["z", t], ["out"])])
    assert g.op_counts()["Add"] == 1 and "Sub" not in g.op_counts()
    assert g.info("out") == TensorInfo(F32, ("batch", 4))  # written again: its info is kept
    assert g.info(t) == TensorInfo(None)  # new: unknown
    assert g.nodes.index(g.producer(t)) < g.nodes.index(g.producer("out"))
    g.validate()
    _assert_same_outputs(before, g, _x())  # a - b == a + (-b) exactly in IEEE arithmetic


def test_replace_node_drops_outputs_nobody_writes_any_more():
    g = small_graph()
    g.replace_node(g.producer("dead1"), _node("Neg", ["x"], ["other"]))
    assert "dead1" not in g.values and "other" in g.values


def test_replace_uses_rewrites_nodes_and_graph_outputs():
    g = small_graph()
    before = g.copy()
    relu = g.producer("z")
    # Insert y2 = Identity(y) after the Mul. Rewire first: replace_uses rewrites *every* reader,
    # so a node added before the call would end up reading its own output.
    g.replace_uses("y", "y2")
    g.add_node(_node("Identity", ["y"], ["y2"]), [g.info("y")], index=g.nodes.index(g.producer("y")) + 1)
    assert [n.op for n in g.consumers("y")] == ["Identity"]
    assert [n.op for n in g.consumers("y2")] == ["Relu", "Neg"]
    assert relu.inputs == ("y",)  # the old node object is unchanged; the graph holds a new one
    g.validate()
    _assert_same_outputs(before, g, _x())
    g.replace_uses("out", "z")
    assert g.outputs == ["z"]
    g.validate()


def test_a_node_taken_before_rewiring_can_still_be_edited():
    g = small_graph()
    relu, neg = g.producer("z"), g.producer("dead1")
    g.replace_uses("y", "x")  # Relu and Neg now read x: the graph holds new node objects
    assert relu.inputs == ("y",) and g.current(relu).inputs == ("x",)
    assert relu not in g.nodes
    g.replace_node(relu, _node("Abs", ["x"], ["z"]))  # found by the value it defines
    assert g.producer("z").op == "Abs"
    g.remove_node(g.producer("dead2"))
    g.remove_node(neg)
    assert g.op_counts() == {"Abs": 1, "Mul": 1, "Sub": 1}
    g.validate()
    with pytest.raises(GraphError, match="not in graph"):
        g.current(_node("Neg", ["x"], ["nowhere"]))
    with pytest.raises(GraphError, match="not in graph"):
        g.remove_node(neg)


def test_remove_unused_drops_dead_chains_and_constants():
    g = small_graph()
    before = g.copy()
    assert g.remove_unused() == 2  # Neg → Abs, a chain nobody reads
    assert "dead1" not in g.values and "dead2" not in g.values
    assert "unused_c" not in g.values and "w" in g.values and "x" in g.values
    assert g.remove_unused() == 0
    g.validate()
    _assert_same_outputs(before, g, _x())


# ------------------------------------------------------------------ copy


def test_copy_is_independent_of_the_original():
    g = small_graph()
    original = str(g)
    infos = {n: v.info for n, v in g.values.items()}
    c = g.copy()
    c.set_info("y", TensorInfo(F32, (7, 4)))
    c.add_node(_node("Neg", ["out"], ["extra"]))
    c.add_output("extra")
    c.replace_uses("z", "y")
    c.remove_node(c.producer("dead2"))
    c.remove_unused()
    assert str(g) == original
    assert {n: v.info for n, v in g.values.items()} == infos
    assert g.outputs == ["out"] and len(g) == 5
    # and the other way round
    snapshot = str(c)
    g.remove_unused()
    g.set_info("x", TensorInfo(F32, (2, 4)))
    assert str(c) == snapshot
    assert c.info("x").shape == ("batch", 4)


# ------------------------------------------------------------------ validate


def test_validate_accepts_a_well_formed_graph():
    small_graph().validate()


def test_validate_rejects_use_before_definition():
    g = small_graph()
    g.add_node(_node("Neg", ["z"], ["early"]), index=0)  # reads z before Relu writes it
    with pytest.raises(GraphError, match="'z' is not defined before"):
        g.validate()


def test_validate_rejects_an_undeclared_input():
    g = small_graph()
    g.add_node(_node("Neg", ["ghost"], ["q"]))
    with pytest.raises(GraphError, match="'ghost'"):
        g.validate()


def test_validate_rejects_a_value_written_twice():
    g = small_graph()
    # replace_node keeps an existing value when a new node writes it, so Neg now writes y twice.
    g.replace_node(g.producer("dead1"), _node("Neg", ["x"], ["y"]))
    with pytest.raises(GraphError, match="'y' is written more than once"):
        g.validate()


def test_validate_rejects_writing_a_graph_input():
    g = small_graph()
    g.replace_node(g.producer("dead1"), _node("Neg", ["y"], ["x"]))
    with pytest.raises(GraphError, match="'x' is written more than once"):
        g.validate()


def test_validate_rejects_a_missing_graph_output():
    g = small_graph()
    g.remove_node(g.producer("out"))
    with pytest.raises(GraphError, match="graph output 'out' is never computed"):
        g.validate()


# ------------------------------------------------------------------ a pass-like rewrite


def _mul_by_one_model(extra_scale: float):
    """y = x * 1.0; t = 1.0 * y; b = x * ones[3, 1, 4] (broadcasts: must stay); s = t * extra_scale."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s", "b", "y")]
    inits = [
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("ones", TensorProto.FLOAT, [3, 1, 4], [1.0] * 12),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [extra_scale]),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["y"]),
        helper.make_node("Mul", ["one", "y"], ["t"]),
        helper.make_node("Mul", ["x", "ones"], ["b"]),
        helper.make_node("Mul", ["t", "scale"], ["s"]),
    ]
    return helper.make_model(helper.make_graph(nodes, "mul_by_one", [x], outs, inits), opset_imports=[helper.make_opsetid("", 17)])


def fold_mul_by_one(g: Graph) -> int:
    """Replace Mul(x, 1) by Identity(x) where the constant changes neither shape nor dtype."""
    identity_version = lookup("Identity", g.opset).since
    done = 0
    for node in g:
        if node.op != "Mul":
            continue
        for keep, other in ((0, 1), (1, 0)):
            c = g.const(node.inputs[other])
            x_info, out_info = g.info(node.inputs[keep]), g.info(node.outputs[0])
            if c is not None and np.all(c == 1) and x_info.shape == out_info.shape and x_info.dtype == out_info.dtype:
                g.replace_node(node, Node("Identity", (node.inputs[keep],), node.outputs, version=identity_version))
                done += 1
                break
    g.remove_unused()
    return done


def drop_identities(g: Graph) -> None:
    """Make readers of an Identity's output read its input (graph outputs keep their Identity)."""
    # replace_uses swaps reader nodes for new ones, so look the next Identity up afresh each time.
    while (node := next((n for n in g if n.op == "Identity" and n.outputs[0] not in g.outputs), None)) is not None:
        g.replace_uses(node.outputs[0], node.inputs[0])
        g.remove_node(node)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.floats(-4, 4, allow_nan=False, width=32).filter(lambda v: v != 1), st.integers(0, 2**16))
def test_mul_by_one_rewrite_keeps_outputs(batch, scale, seed):
    before = import_onnx(_mul_by_one_model(scale))
    after = before.copy()
    assert fold_mul_by_one(after) == 2
    assert after.op_counts() == {"Identity": 2, "Mul": 2}  # the broadcasting Mul and the scale stay
    assert "one" not in after.values and "ones" in after.values
    after.validate()
    assert before.op_counts() == {"Mul": 4}  # the rewrite worked on a copy
    x = _x(batch, seed)
    _assert_same_outputs(before, after, x)

    drop_identities(after)
    after.validate()
    assert after.op_counts() == {"Identity": 1, "Mul": 2}  # y is a graph output: its Identity stays
    _assert_same_outputs(before, after, x)
