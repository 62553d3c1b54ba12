"""Chaining of sparse Dense steps in the plan (runtime/sparse_lowering): which pairs chain, that a
chained intermediate gets no buffer, and that chained plans compute what the reference executor
and the unchained plan compute."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.graph import Graph, Node, TensorInfo, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.runtime.plan import Plan
from sparseinfer.runtime.sparse_lowering import chunk_lanes
from tests.tolerances import tolerance

M, DIMS = 37, (40, 70, 50, 40)  # rows and widths that are not multiples of 16 or of the blocks
TOL = tolerance("plan", np.float32)


def sparse_weight(rng, k, n, block=(1, 1), density=0.3):
    r, c = block
    keep = np.kron(rng.random((-(-k // r), -(-n // c))) < density, np.ones(block, bool))[:k, :n]
    return (rng.uniform(-1, 1, (k, n)) * keep).astype(np.float32)


def chain_graph(layouts, dims=DIMS, *, residual_on=None, also_output=False, extra_reader=False, h_as_residual=False, int8=()):
    """x -> Dense_0 -> h0 -> Dense_1 -> h1 ... with the given (layout, block) per Dense; bias on every
    Dense, GELU on all but the last; the Dense numbered in `int8` marked quantize="int8". Options
    break the chaining conditions for h0."""
    rng = np.random.default_rng(len(layouts))
    g = Graph("sparse-chain")
    g.add_input("x", TensorInfo(np.float32, (M, dims[0])))
    x = "x"
    for i, (layout, block) in enumerate(layouts):
        k, n = dims[i], dims[i + 1]
        g.add_constant(f"w{i}", sparse_weight(rng, k, n, block or (1, 1)))
        g.add_constant(f"b{i}", rng.uniform(-1, 1, n).astype(np.float32))
        res = ""
        if residual_on == i:
            g.add_input(f"r{i}", TensorInfo(np.float32, (M, n)))
            res = f"r{i}"
        if h_as_residual and i == 1:
            res = x  # h0 read twice by Dense_1 (k == n here)
        attrs = {"activation": "gelu" if i < len(layouts) - 1 else "none", "layout": layout}
        if block:
            attrs["block"] = block
        if i in int8:
            attrs["quantize"] = "int8"
        g.add_node(Node("Dense", (x, f"w{i}", f"b{i}", res), (f"h{i}",), attrs, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (M, n))])
        x = f"h{i}"
    g.add_output(x)
    if also_output:
        g.add_output("h0")
    if extra_reader:
        g.add_node(Node("Relu", ("h0",), ("h0_relu",)), [TensorInfo(np.float32, (M, dims[1]))])
        g.add_output("h0_relu")
    return g


def feeds_for(g: Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.uniform(-1, 1, g.info(name).shape).astype(np.float32) for name in g.inputs}


def check_outputs(g: Graph, plan: Plan) -> None:
    feeds = feeds_for(g)
    ours = plan.run(feeds)
    unchained = Plan(g, chain_sparse=False)
    assert not unchained.sparse_chains
    for a, ref, u in zip(ours, run_graph(g, feeds), unchained.run(feeds)):
        np.testing.assert_allclose(a, ref, **TOL)
        np.testing.assert_array_equal(a, u)  # the same arithmetic in the same order
    second = [o.copy() for o in plan.run(feeds)]  # a reused arena gives the same bits
    for a, b in zip(ours, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "layouts",
    [
        [("csr", None), ("csr", None)],
        [("bsr", (1, 4)), ("bsr", (4, 4))],
        [("csr", None), ("bsr", (2, 2))],  # CSR and 2-wide blocks share the 128-row chunk
    ],
)
def test_pair_is_chained(layouts):
    g = chain_graph(layouts)
    plan = Plan(g)
    assert list(plan.sparse_chains) == ["h0"]
    chain = plan.sparse_chains["h0"]
    assert chain.producer.outputs == ("h0",) and chain.consumer.inputs[0] == "h0"
    assert "h0" not in plan.buffers.slot_of and chain.workspace in plan.workspaces
    assert [st.buffer for st in plan.steps] == [False, True]
    check_outputs(g, plan)


def test_csr_and_1x4_chain_when_their_chunks_agree():
    # 1 x 4 blocks use 64-row chunks; CSR narrows its 128-row chunk to 64 when M leaves a thread
    # without a chunk of its own (M = 37 and 2+ threads), and only then do the two share xt
    g = chain_graph([("csr", None), ("bsr", (1, 4))])
    plan = Plan(g)
    assert bool(plan.sparse_chains) == (chunk_lanes(1, M) == chunk_lanes(4, M))
    check_outputs(g, plan)


def test_three_links_use_two_workspaces():
    # the middle Dense reads one chained workspace and writes another: they must not be the same array
    g = chain_graph([("csr", None), ("csr", None), ("csr", None)])
    plan = Plan(g)
    assert list(plan.sparse_chains) == ["h0", "h1"]
    assert plan.sparse_chains["h0"].workspace != plan.sparse_chains["h1"].workspace
    check_outputs(g, plan)


@pytest.mark.parametrize(
    "layouts, options",
    [
        ([("csr", None), ("csr", None)], {"also_output": True}),
        ([("csr", None), ("csr", None)], {"extra_reader": True}),
        ([("csr", None), ("csr", None)], {"residual_on": 0}),  # the producer's residual is row-major
        ([("csr", None), ("bsr", (1, 8))], {}),  # 64- or 128-row vs 32-row chunks
        ([("csr", None), ("dense", None)], {}),
        ([("dense", None), ("csr", None)], {}),
    ],
)
def test_not_chained(layouts, options):
    g = chain_graph(layouts, **options)
    plan = Plan(g)
    assert not plan.sparse_chains
    assert all(st.buffer for st in plan.steps)
    feeds = feeds_for(g)
    for a, ref in zip(plan.run(feeds), run_graph(g, feeds)):
        np.testing.assert_allclose(a, ref, **TOL)


def test_intermediate_read_twice_by_the_consumer_is_not_chained():
    # Dense_1 square, so h0 can be its residual too
    g = chain_graph([("csr", None), ("csr", None)], (40, 70, 70, 40), h_as_residual=True)
    plan = Plan(g)
    assert not plan.sparse_chains
    feeds = feeds_for(g)
    for a, ref in zip(plan.run(feeds), run_graph(g, feeds)):
        np.testing.assert_allclose(a, ref, **TOL)


# ----------------------------------------------------------------------------- int8 (sparse int8 kernel)

INT8 = [("bsr", (4, 1))]


def check_int8_outputs(g: Graph, plan: Plan) -> None:
    """Chaining must not change a bit (the quantization of the intermediate is the same); the
    int8 arithmetic itself is checked against the reference in tests/kernels/test_int8_sparse.py."""
    feeds = feeds_for(g)
    ours = plan.run(feeds)
    for a, u in zip(ours, Plan(g, chain_sparse=False).run(feeds)):
        np.testing.assert_array_equal(a, u)
    for a, b in zip(ours, [o.copy() for o in plan.run(feeds)]):
        np.testing.assert_array_equal(a, b)


def test_int8_pair_is_chained():
    g = chain_graph(INT8 * 2, int8=(0, 1))
    plan = Plan(g)
    assert list(plan.sparse_chains) == ["h0"]
    chain = plan.sparse_chains["h0"]
    assert chain.workspace.startswith("Sparse_int8__chain") and f"{chain.workspace}__range" in plan.workspaces
    assert "h0" not in plan.buffers.slot_of
    assert [st.buffer for st in plan.steps] == [False, True]
    check_int8_outputs(g, plan)


def test_int8_chain_link_does_not_run_through():
    # the middle Dense reads the first chain; it writes its result row-major for the third
    g = chain_graph(INT8 * 3, (40, 70, 50, 40), int8=(0, 1, 2))
    plan = Plan(g)
    assert list(plan.sparse_chains) == ["h0"]
    assert [st.buffer for st in plan.steps] == [False, True, True]
    check_int8_outputs(g, plan)


@pytest.mark.parametrize(
    "layouts, int8, options",
    [
        (INT8 * 2, (0, 1), {"residual_on": 0}),
        (INT8 * 2, (0, 1), {"also_output": True}),
        (INT8 * 2, (0,), {}),  # an int8 producer and an fp32 consumer
        (INT8 * 2, (1,), {}),
        ([("dense", None)] + INT8, (0, 1), {}),  # the dense int8 kernel does not chain
    ],
)
def test_int8_not_chained(layouts, int8, options):
    g = chain_graph(layouts, int8=int8, **options)
    plan = Plan(g)
    assert not plan.sparse_chains
    assert all(st.buffer for st in plan.steps)
