"""Element-wise kernels against the NumPy reference ops (Gelu, Add, Exp)."""

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import njit

from sparseinfer.graph import reference
from sparseinfer.graph.registry import lookup
from sparseinfer.kernels import elementwise as E
from tests.tolerances import tolerance

ADD = lookup("Add", 17).fn
EXP = lookup("Exp", 17).fn


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 20),
    N=st.integers(1, 100),
    scale=st.sampled_from([0.0, 1.0, 5.0]),
)
@example(seed=0, M=1, N=1, scale=1.0)
def test_gelu(seed, M, N, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) * scale).astype(np.float32)
    ref = reference.gelu(x.astype(np.float64))  # float64 values: the kernels' errors, not the reference's rounding
    out = np.full_like(x, np.nan)
    E.gelu(x, out)
    np.testing.assert_allclose(out, ref, **tolerance("gelu", np.float32))
    out[:] = np.nan
    E.gelu_exact(x, out)
    np.testing.assert_allclose(out, ref, **tolerance("gelu_exact", np.float32))


def test_gelu_non_finite():
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0]], np.float32)
    ref = reference.gelu(x.astype(np.float64))  # nan, inf, nan (-inf * 0), 0, -0
    for kernel in (E.gelu, E.gelu_exact):
        out = np.empty_like(x)
        kernel(x, out)
        np.testing.assert_array_equal(out, ref)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), N=st.integers(1, 100))
def test_add_and_bias(seed, M, N):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, N)).astype(np.float32)
    b = rng.standard_normal((M, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = np.empty_like(a)
    E.add(a, b, out)  # one correctly rounded fp32 add per element: exact
    np.testing.assert_array_equal(out, ADD(a, b))
    E.add_bias(a, bias, out)
    np.testing.assert_array_equal(out, ADD(a, bias))
    want = ADD(a, b)
    E.add(a, b, a)  # out may alias an input
    np.testing.assert_array_equal(a, want)


@njit(error_model="numpy")
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = E.exp_f32(x[i])


def test_exp_f32_accuracy():
    x = np.concatenate([np.linspace(-87.3, 88.7, 400001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    np.testing.assert_allclose(out, EXP(x.astype(np.float64)), **tolerance("exp", np.float32))
    special = np.array([np.inf, -np.inf, np.nan, -100.0, 100.0], np.float32)
    out = np.empty_like(special)
    _exp_all(special, out)
    assert out[0] == np.inf and out[1] == 0.0 and np.isnan(out[2])
    assert out[3] == 0.0 and out[4] == np.inf
