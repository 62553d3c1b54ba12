"""Layernorm kernel against the LayerNormalization op of the NumPy reference."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels.norm import layernorm
from tests.tolerances import tolerance


def expected(x, gamma, beta, eps, residual=None):
    """The fused residual is the Add before LayerNormalization in the graph: summed in fp32."""
    s = x if residual is None else (x + residual).astype(np.float32)
    return reference.layer_normalization(s, gamma, beta, axis=-1, epsilon=eps)[0]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 20),
    N=st.integers(1, 200),
    use_res=st.booleans(),
    eps=st.sampled_from([1e-12, 1e-5]),
    offset=st.sampled_from([0.0, 10.0]),
    x_kind=st.sampled_from(["random", "zero", "zero_rows"]),
)
@example(seed=0, M=1, N=1, use_res=False, eps=1e-12, offset=0.0, x_kind="random")
@example(seed=1, M=5, N=33, use_res=True, eps=1e-5, offset=10.0, x_kind="zero")
def test_layernorm_random(seed, M, N, use_res, eps, offset, x_kind):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) + offset).astype(np.float32)
    if x_kind == "zero":
        x[:] = 0.0
    elif x_kind == "zero_rows":
        x[rng.random(M) < 0.5] = 0.0
    res = rng.standard_normal((M, N)).astype(np.float32) if use_res and x_kind == "random" else None
    g = rng.standard_normal(N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    out = layernorm(x, g, b, eps, res)
    np.testing.assert_allclose(out, expected(x, g, b, eps, res), **tolerance("layernorm", np.float32))


def test_layernorm_of_constant_rows_is_beta():
    """Zero variance (e.g. a row of one repeated value): (x - mean) is 0, so the output is beta."""
    rng = np.random.default_rng(4)
    x = np.repeat(rng.standard_normal((20, 1)).astype(np.float32), 9, axis=1)
    g, b = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    ref = expected(x, g, b, 1e-12)
    np.testing.assert_allclose(ref, np.broadcast_to(b, ref.shape), **tolerance("layernorm", np.float32))
    np.testing.assert_allclose(layernorm(x, g, b, 1e-12), ref, **tolerance("layernorm", np.float32))


@pytest.mark.parametrize("scale", [1e18, 1e25, 1e36])
def test_layernorm_of_huge_values_matches_the_reference(scale):
    """Deviations whose float32 squares overflow: those rows are normalised in float64."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 50)) * scale).astype(np.float32)
    g, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    out = layernorm(x, g, b, 1e-12)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected(x, g, b, 1e-12), **tolerance("layernorm", np.float32))


def test_layernorm_of_no_rows():
    out = layernorm(np.zeros((0, 7), np.float32), np.ones(7, np.float32), np.zeros(7, np.float32))
    assert out.shape == (0, 7)


def test_layernorm_in_place():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 768)).astype(np.float32)
    r = rng.standard_normal((16, 768)).astype(np.float32)
    g = np.ones(768, np.float32)
    b = np.zeros(768, np.float32)
    ref = expected(x, g, b, 1e-12, r)
    layernorm(x, g, b, 1e-12, r, out=x)
    np.testing.assert_allclose(x, ref, **tolerance("layernorm", np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_layernorm_non_finite_input_spoils_only_its_row(bad):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 50)).astype(np.float32)
    x[3, 10] = bad
    g, b = np.ones(50, np.float32), np.zeros(50, np.float32)
    out = layernorm(x, g, b, 1e-5)
    ref = expected(x, g, b, 1e-5)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(out[3]).any() and np.isfinite(np.delete(out, 3, axis=0)).all()
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(out[ok], ref[ok], **tolerance("layernorm", np.float32))
