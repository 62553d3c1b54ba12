"""choose_sparse_layouts: measurements on weights of known structure, the choice, overrides."""

import numpy as np
import pytest

from sparseinfer.graph import run_graph
from sparseinfer.passes import (
    PassContext,
    SparsityConfig,
    analyze_weight,
    choose_sparse_layouts,
    eliminate_dead_code,
    fold_constants,
    fuse_dense,
    fuse_gelu,
)
from sparseinfer.passes.sparsity import MAX_DENSITY, choose_layout

from .builders import f32, onnx_graph, optimize
from .test_fusion import node


def _weight(k=64, n=64, density=1.0, block=None, seed=0):
    """A [k, n] weight whose non-zeros are `density` of the elements (or of the r x c blocks)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, (k, n)).astype(np.float32) * rng.choice([-1, 1], (k, n))
    r, c = block or (1, 1)
    keep = rng.random((k // r, n // c)) < density
    return (w * np.kron(keep, np.ones((r, c)))).astype(np.float32)


def test_analyze_weight_measures_elements_and_blocks():
    w = np.zeros((8, 8), np.float32)
    w[0:4, 0] = 1.0  # one 4x1 block, spread over four 1x4 blocks
    stats = analyze_weight(w, ((1, 4), (4, 1)))
    assert stats.sparsity == 1 - 4 / 64
    assert stats.block_sparsity[(4, 1)] == 1 - 1 / 16
    assert stats.block_sparsity[(1, 4)] == 1 - 4 / 16


def test_blocks_that_do_not_tile_are_not_measured():
    assert (1, 4) not in analyze_weight(np.ones((8, 6), np.float32), ((1, 4),)).block_sparsity


@pytest.mark.parametrize(
    "density, block, expected",
    [
        (1.0, None, ("dense", None)),  # nothing to gain
        (0.6, None, ("dense", None)),  # above every break-even for unstructured zeros
        (0.1, None, ("csr", None)),  # unstructured: zeros do not line up in blocks
        (0.1, (1, 4), ("bsr", (1, 4))),  # whole 1x4 blocks are zero: fewer stored values, faster kernel
        (0.1, (4, 4), ("bsr", (4, 4))),
        (0.5, (1, 4), ("bsr", (1, 4))),  # 1x4 blocks pay off up to 70% density
        (0.9, (1, 4), ("dense", None)),
    ],
)
def test_layout_choice_on_known_structure(density, block, expected):
    stats = analyze_weight(_weight(64, 64, density, block), SparsityConfig().blocks)
    assert choose_layout(stats, SparsityConfig()) == expected


def test_break_even_override_and_forced_layouts():
    stats = analyze_weight(_weight(64, 64, 0.1), SparsityConfig().blocks)
    # CSR's break-even lowered below this weight's density: 1x4 blocks (34% of them non-zero
    # here) are still predicted faster than dense; with every limit at 0 nothing is
    assert choose_layout(stats, SparsityConfig(max_density={**MAX_DENSITY, "csr": 0.05})) == ("bsr", (1, 4))
    assert choose_layout(stats, SparsityConfig(max_density=dict.fromkeys(MAX_DENSITY, 0.0))) == ("dense", None)
    assert choose_layout(stats, SparsityConfig(layout="dense")) == ("dense", None)
    assert choose_layout(stats, SparsityConfig(layout="csr")) == ("csr", None)
    assert choose_layout(stats, SparsityConfig(layout="bsr"))[0] == "bsr"


def _dense_graph(w):
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["y"])]
    return onnx_graph(nodes, {"x": [3, w.shape[0]]}, ["y"], {"w": w, "b": f32(np.zeros(w.shape[1]))})


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, "csr"),
        ({"sparsity": {"layout": "dense"}}, "dense"),
        ({"sparsity": {"per_weight": {"w": "dense"}}}, "dense"),
        ({"sparsity": {"per_weight": {"w": ["bsr", [1, 4]]}}}, "bsr"),
        ({"sparsity": {"max_density": dict.fromkeys(MAX_DENSITY, 0.01)}}, "dense"),
    ],
)
def test_pass_records_the_choice_and_outputs_do_not_change(config, expected):
    before = _dense_graph(_weight(64, 32, 0.1))
    after = optimize(
        before, fold_constants, fuse_gelu, fuse_dense, choose_sparse_layouts, eliminate_dead_code, ctx=PassContext(config=config)
    )
    (dense,) = [n for n in after.nodes if n.op == "Dense"]
    assert dense.attrs["layout"] == expected
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run_graph(after, [x])[0], run_graph(before, [x])[0], rtol=1e-5, atol=1e-5)


def test_bad_sparsity_config_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown sparsity setting"):
        SparsityConfig.from_context(PassContext(config={"sparsity": {"treshold": 0.2}}))
    with pytest.raises(ValueError, match="layout must be"):
        SparsityConfig.from_context(PassContext(config={"sparsity": {"layout": "coo"}}))
