"""BERT encoder layers with sparse weights held feature-major between their steps
(runtime/feature_major): the residual stream, the Q/K/V projection, the context and the
feed-forward intermediate, through the LayerNorm and attention kernels' feature-major variants.
Plans are checked against the reference executor and against the plan that keeps every value
row-major (the matmuls and the attention do the same arithmetic either way; the LayerNorms sum
in another order, a few ulp)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.graph import Graph, Node, TensorInfo, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.kernels.attention import fm_supported
from sparseinfer.runtime.feature_major import fm_shape
from sparseinfer.runtime.plan import Plan
from sparseinfer.runtime.sparse_lowering import chunk_lanes
from tests.runtime.test_sparse_chain import sparse_weight
from tests.tolerances import tolerance

HIDDEN, HEADS, FF = 64, 4, 128  # heads of 16 columns: the smallest the feature-major attention takes
TOL = tolerance("plan", np.float32)


def encoder(b, s, layers=2, block=None):
    """x -> LayerNorm -> ``layers`` BERT layers (fused Q/K/V, attention with a padding mask, output
    projection + residual, LayerNorm, FF1 with GELU, FF2 + residual, LayerNorm) -> y, every
    Dense sparse (CSR, or ``block``)."""
    rng = np.random.default_rng(b * 100 + s)
    g = Graph("encoder")
    f32 = np.float32
    g.add_input("x", TensorInfo(f32, (b, s, HIDDEN)))
    g.add_input("mask", TensorInfo(f32, (b, 1, 1, s)))

    def const(name, shape, scale=1.0):
        g.add_constant(name, (rng.uniform(-1, 1, shape) * scale).astype(f32))
        return name

    def layernorm(x, out):
        gamma = (1 + rng.uniform(-0.2, 0.2, HIDDEN)).astype(f32)
        g.add_constant(f"{out}_g", gamma)
        const(f"{out}_b", (HIDDEN,), 0.1)
        g.add_node(
            Node("LayerNormalization", (x, f"{out}_g", f"{out}_b"), (out,), {"epsilon": 1e-12, "axis": -1}, version=17),
            [TensorInfo(f32, (b, s, HIDDEN))],
        )
        return out

    def dense(x, k, n, out, residual="", act="none"):
        g.add_constant(f"{out}_w", sparse_weight(rng, k, n, block or (1, 1), 0.3) * f32(1.5 / np.sqrt(k * 0.3)))
        const(f"{out}_bias", (n,), 0.1)
        attrs = {"activation": act, "layout": "csr" if block is None else "bsr"}
        if block is not None:
            attrs["block"] = block
        g.add_node(
            Node("Dense", (x, f"{out}_w", f"{out}_bias", residual), (out,), attrs, domain=ENGINE_DOMAIN), [TensorInfo(f32, (b, s, n))]
        )
        return out

    h = layernorm("x", "h")
    for i in range(layers):
        qkv = dense(h, HIDDEN, 3 * HIDDEN, f"qkv{i}")
        attrs = {"num_heads": HEADS, "scale": 0.25, "hidden": HIDDEN, "q_offset": 0, "k_offset": HIDDEN, "v_offset": 2 * HIDDEN}
        g.add_node(Node("Attention", (qkv, qkv, qkv, "mask"), (f"ctx{i}",), attrs, domain=ENGINE_DOMAIN), [TensorInfo(f32, (b, s, HIDDEN))])
        a = dense(f"ctx{i}", HIDDEN, HIDDEN, f"attn_out{i}", residual=h)
        h1 = layernorm(a, f"h1_{i}")
        f = dense(h1, HIDDEN, FF, f"ff1_{i}", act="gelu")
        f2 = dense(f, FF, HIDDEN, f"ff2_{i}", residual=h1)
        h = layernorm(f2, f"h{i + 1}")
    g.add_output(h)
    return g


def feeds(g: Graph) -> dict[str, np.ndarray]:
    b, _, _, s = g.info("mask").shape
    rng = np.random.default_rng(3)
    mask = np.zeros((b, 1, 1, s), np.float32)
    mask[-1, ..., s - s // 4 :] = np.finfo(np.float32).min  # padding in the last batch row
    return {"x": rng.normal(0, 1, g.info("x").shape).astype(np.float32), "mask": mask}


def check(g: Graph, plan: Plan) -> None:
    fd = feeds(g)
    ours = plan.run(fd)
    row_major = Plan(g, chain_sparse=False)
    assert not row_major.feature_major
    for a, ref, u in zip(ours, run_graph(g, fd), row_major.run(fd)):
        np.testing.assert_allclose(a, ref, **TOL)
        np.testing.assert_allclose(a, u, rtol=1e-5, atol=1e-5)
    for a, again in zip(ours, [o.copy() for o in plan.run(fd)]):
        np.testing.assert_array_equal(a, again)


def layer_values(i):
    return {f"qkv{i}", f"ctx{i}", f"attn_out{i}", f"h1_{i}", f"ff1_{i}", f"ff2_{i}"}


@pytest.mark.parametrize("b, s, block", [(2, 32, None), (1, 64, (1, 4)), (3, 32, (1, 4))])
def test_encoder_runs_feature_major(b, s, block):
    g = encoder(b, s, block=block)
    plan = Plan(g)
    lanes = chunk_lanes(1 if block is None else block[1], b * s)
    assert fm_supported(s, HIDDEN // HEADS, lanes)
    # everything between the first LayerNorm and the last, which writes the graph output row-major
    assert set(plan.feature_major) == {"h", "h1"} | layer_values(0) | layer_values(1)
    assert all(plan.feature_major[v] == fm_shape(g, v, lanes) for v in plan.feature_major)
    assert not any(st.node.op == "Transpose" or st.kind == "reference" for st in plan.steps)
    check(g, plan)


def test_attention_that_cannot_read_feature_major_keeps_its_input_and_output_row_major():
    # 40 keys: not a multiple of 32, so the attention reads Q/K/V row-major; the rest stays feature-major
    g = encoder(2, 40)
    plan = Plan(g)
    assert set(plan.feature_major) == ({"h", "h1"} | layer_values(0) | layer_values(1)) - {"qkv0", "ctx0", "qkv1", "ctx1"}
    check(g, plan)


def test_a_value_read_row_major_by_one_step_is_row_major_for_all():
    # h1_0 is also a graph output: its LayerNorm writes it row-major, so FF1 transposes it and
    # FF2 takes it as a row-major residual (and writes its own result row-major)
    g = encoder(2, 32)
    g.add_output("h1_0")
    plan = Plan(g)
    fm = set(plan.feature_major)
    assert "h1_0" not in fm and "ff2_0" not in fm and "ff1_0" in fm and "attn_out0" in fm
    check(g, plan)
