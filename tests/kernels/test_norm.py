"""Layernorm kernel vs plain NumPy."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.kernels.norm import layernorm


def layernorm_ref(x, gamma, beta, eps, residual=None):
    s = x.astype(np.float64)
    if residual is not None:
        s = s + residual
    mu = s.mean(-1, keepdims=True)
    var = ((s - mu) ** 2).mean(-1, keepdims=True)
    return (s - mu) / np.sqrt(var + eps) * gamma + beta


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 20),
    N=st.integers(1, 200),
    use_res=st.booleans(),
    eps=st.sampled_from([1e-12, 1e-5]),
    offset=st.sampled_from([0.0, 10.0]),
)
def test_layernorm_random(seed, M, N, use_res, eps, offset):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) + offset).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32) if use_res else None
    g = rng.standard_normal(N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    out = layernorm(x, g, b, eps, res)
    ref = layernorm_ref(x, g, b, eps, res)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_layernorm_in_place():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 768)).astype(np.float32)
    r = rng.standard_normal((16, 768)).astype(np.float32)
    g = np.ones(768, np.float32)
    b = np.zeros(768, np.float32)
    ref = layernorm_ref(x, g, b, 1e-12, r)
    layernorm(x, g, b, 1e-12, r, out=x)
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)
