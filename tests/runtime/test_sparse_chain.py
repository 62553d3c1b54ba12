"""Feature-major values between sparse Dense steps in the plan (runtime/feature_major): which
values the plan keeps feature-major, that they get buffers of that layout, and that such plans
compute what the reference executor computes and, bit for bit, what the plan without them
computes (the matmuls do the same arithmetic either way); the sparse int8 kernel's chains."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.graph import Graph, Node, TensorInfo, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.runtime.feature_major import fm_shape
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
    row_major = Plan(g, chain_sparse=False)
    assert not row_major.feature_major and not row_major.sparse_chains
    for a, ref, u in zip(ours, run_graph(g, feeds), row_major.run(feeds)):
        np.testing.assert_allclose(a, ref, **TOL)
        np.testing.assert_array_equal(a, u)  # the same arithmetic in the same order
    second = [o.copy() for o in plan.run(feeds)]  # a reused arena gives the same bits
    for a, b in zip(ours, second):
        np.testing.assert_array_equal(a, b)


def check_feature_major(g: Graph, plan: Plan, values: list[str]) -> None:
    """Exactly ``values`` are feature-major, each in a buffer of that layout."""
    assert list(plan.feature_major) == values
    lanes = chunk_lanes(1, M)
    arena = plan._new_arena()
    for v in values:
        assert plan.feature_major[v] == fm_shape(g, v, lanes) and arena[v].shape == fm_shape(g, v, lanes)
        assert arena[v].ctypes.data % 64 == 0


@pytest.mark.parametrize(
    "layouts",
    [
        [("csr", None), ("csr", None)],
        [("bsr", (1, 4)), ("bsr", (4, 4))],
        [("csr", None), ("bsr", (2, 2))],  # CSR and 2-wide blocks share the row chunk
    ],
)
def test_pair_is_feature_major(layouts):
    g = chain_graph(layouts)
    plan = Plan(g)
    check_feature_major(g, plan, ["h0"])
    assert plan.feature_major["h0"][1] == 72  # 70 features, rows rounded up to 8 (zeroed by the writer)
    check_outputs(g, plan)


def test_csr_and_1x4_share_the_layout_when_their_chunks_agree():
    # 1 x 4 blocks use 64-row chunks; CSR narrows its 128-row chunk to 64 when M leaves a thread
    # without a chunk of its own (M = 37 and 2+ threads), and only then do the two share xt
    g = chain_graph([("csr", None), ("bsr", (1, 4))])
    plan = Plan(g)
    assert bool(plan.feature_major) == (chunk_lanes(1, M) == chunk_lanes(4, M))
    check_outputs(g, plan)


def test_three_links_use_two_buffers():
    # the middle Dense reads one feature-major value and writes another: not the same memory
    g = chain_graph([("csr", None), ("csr", None), ("csr", None)])
    plan = Plan(g)
    check_feature_major(g, plan, ["h0", "h1"])
    assert plan.buffers.slot_of["h0"] != plan.buffers.slot_of["h1"]
    check_outputs(g, plan)


def residual_graph(layout=("csr", None)):
    """x -> D0 -> h0 -> D1 -> h1 -> D2 (+ h0) -> h2 -> D3 -> h3: h0 is read as an x and as a
    residual, both by steps whose results are feature-major."""
    rng = np.random.default_rng(7)
    g = Graph("sparse-residual")
    g.add_input("x", TensorInfo(np.float32, (M, 40)))
    for i, (x, k, n, res) in enumerate([("x", 40, 70, ""), ("h0", 70, 50, ""), ("h1", 50, 70, "h0"), ("h2", 70, 40, "")]):
        g.add_constant(f"w{i}", sparse_weight(rng, k, n, layout[1] or (1, 1)))
        g.add_constant(f"b{i}", rng.uniform(-1, 1, n).astype(np.float32))
        attrs = {"activation": "gelu" if i == 1 else "none", "layout": layout[0]}
        if layout[1]:
            attrs["block"] = layout[1]
        g.add_node(Node("Dense", (x, f"w{i}", f"b{i}", res), (f"h{i}",), attrs, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (M, n))])
    g.add_output("h3")
    return g


@pytest.mark.parametrize("layout", [("csr", None), ("bsr", (1, 4))])
def test_a_residual_read_feature_major(layout):
    # D2 adds h0 in the layout of its result (the kernel's xres); h0 stays live across D1 and D2
    g = residual_graph(layout)
    plan = Plan(g)
    check_feature_major(g, plan, ["h0", "h1", "h2"])
    check_outputs(g, plan)


def test_a_residual_makes_its_reader_row_major_when_it_is_row_major():
    # D2's residual is a graph output (row-major), so D2 writes row-major; h1 and h0's other reads are unaffected
    g = residual_graph()
    g.add_output("h0")
    plan = Plan(g)
    check_feature_major(g, plan, ["h1"])
    check_outputs(g, plan)


@pytest.mark.parametrize(
    "layouts, options",
    [
        ([("csr", None), ("csr", None)], {"also_output": True}),
        ([("csr", None), ("csr", None)], {"extra_reader": True}),
        ([("csr", None), ("bsr", (1, 8))], {}),  # 64- or 128-row vs 32-row chunks
        ([("csr", None), ("dense", None)], {}),
        ([("dense", None), ("csr", None)], {}),
    ],
)
def test_row_major(layouts, options):
    g = chain_graph(layouts, **options)
    plan = Plan(g)
    assert not plan.feature_major
    feeds = feeds_for(g)
    for a, ref in zip(plan.run(feeds), run_graph(g, feeds)):
        np.testing.assert_allclose(a, ref, **TOL)


def test_a_producer_with_a_row_major_residual_writes_row_major():
    g = chain_graph([("csr", None), ("csr", None)], residual_on=0)  # the residual is a graph input
    plan = Plan(g)
    assert not plan.feature_major
    check_outputs(g, plan)


def test_intermediate_read_as_x_and_as_residual_of_a_row_major_result():
    # Dense_1 square, so h0 can be its residual too; Dense_1's result is a graph output
    g = chain_graph([("csr", None), ("csr", None)], (40, 70, 70, 40), h_as_residual=True)
    plan = Plan(g)
    assert not plan.feature_major
    check_outputs(g, plan)


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
