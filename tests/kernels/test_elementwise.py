"""Element-wise kernels vs plain NumPy."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.kernels import elementwise as E

_verf = np.vectorize(math.erf)


def gelu_ref(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1.0 + _verf(x / np.sqrt(2.0)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), N=st.integers(1, 100), scale=st.sampled_from([1.0, 5.0]))
def test_gelu(seed, M, N, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) * scale).astype(np.float32)
    out = np.empty_like(x)
    E.gelu(x, out)
    np.testing.assert_allclose(out, gelu_ref(x), rtol=1e-5, atol=1e-6)
    E.gelu_exact(x, out)
    np.testing.assert_allclose(out, gelu_ref(x), rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), N=st.integers(1, 100))
def test_add_and_bias(seed, M, N):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, N)).astype(np.float32)
    b = rng.standard_normal((M, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = np.empty_like(a)
    E.add(a, b, out)
    np.testing.assert_array_equal(out, a + b)
    E.add_bias(a, bias, out)
    np.testing.assert_array_equal(out, a + bias)


def test_exp_f32_accuracy():
    from numba import njit

    @njit(error_model="numpy")
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = E.exp_f32(x[i])

    x = np.concatenate([np.linspace(-87.3, 88.7, 400001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    out = np.empty_like(x)
    run(x, out)
    ref = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=3e-7, atol=0)
    special = np.array([np.inf, -np.inf, np.nan, -100.0, 100.0], np.float32)
    out = np.empty_like(special)
    run(special, out)
    assert out[0] == np.inf and out[1] == 0.0 and np.isnan(out[2])
    assert out[3] == 0.0 and out[4] == np.inf
