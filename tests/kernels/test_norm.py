"""Layernorm kernel against the LayerNormalization op of the NumPy reference."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels.norm import layernorm, layernorm_feature_major, layernorm_packed, layernorm_to_feature_major
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


# --------------------------------------------------------------------------
# feature-major variants
# --------------------------------------------------------------------------

NO_FM = np.empty((0, 0, 0), np.float32)


def to_fm(x, lanes, pad_rows=0, fill=np.nan):
    """Row-major ``[M, N]`` -> feature-major ``[ceil(M / lanes), N + pad_rows, lanes]``: token ``t``,
    feature ``n`` at ``[t // lanes, n, t % lanes]``; padding rows and lanes past M hold ``fill``."""
    M, N = x.shape
    nch = -(-M // lanes)
    xt = np.full((nch, N + pad_rows, lanes), fill, np.float32)
    xp = np.full((nch * lanes, N), fill, np.float32)
    xp[:M] = x
    xt[:, :N, :] = xp.reshape(nch, lanes, N).transpose(0, 2, 1)
    return xt


def from_fm(xt, M, N):
    """Feature-major -> the row-major ``[M, N]`` of its first ``M`` tokens."""
    nch, _, lanes = xt.shape
    return np.ascontiguousarray(xt[:, :N, :].transpose(0, 2, 1).reshape(nch * lanes, N)[:M])


def packed(x, g, b, eps):
    out = np.empty_like(x)
    layernorm_packed(x, None, g, b, np.float32(eps), out)
    return out


def ulps(a, b):
    """Largest distance between a and b in units of the float32 spacing at the larger magnitude."""
    big = np.maximum(np.abs(a), np.abs(b)).astype(np.float32)
    return float((np.abs(a.astype(np.float64) - b) / np.spacing(big)).max(initial=0.0))


def run_fm(xt, g, b, eps, M, mode):
    """``layernorm_feature_major`` writing the result as ``mode`` asks: "fm", "rows", "both" or
    "inplace"; returns (row-major result, feature-major output or None)."""
    N = g.shape[0]
    if mode == "inplace":
        out, _ = layernorm_feature_major(xt, g, b, M, eps, out=xt)
        return from_fm(out, M, N), out
    out = np.full((xt.shape[0], xt.shape[1] + 1, xt.shape[2]), np.nan, np.float32) if mode != "rows" else None
    rows = np.full((M, N), np.nan, np.float32) if mode != "fm" else None
    out, rows = layernorm_feature_major(xt, g, b, M, eps, out=out, rows_out=rows)
    if out is not None and rows is not None:
        np.testing.assert_array_equal(from_fm(out, M, N), rows)
    return (rows if rows is not None else from_fm(out, M, N)), out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 300),
    N=st.integers(1, 200),
    lanes=st.sampled_from([16, 32, 64, 128]),
    pad=st.integers(0, 5),
    eps=st.sampled_from([1e-12, 1e-5]),
    offset=st.sampled_from([0.0, 10.0]),
    mode=st.sampled_from(["fm", "rows", "both", "inplace"]),
)
@example(seed=0, M=128, N=768, lanes=64, pad=0, eps=1e-12, offset=0.0, mode="fm")
@example(seed=1, M=77, N=37, lanes=16, pad=3, eps=1e-5, offset=10.0, mode="both")
def test_layernorm_fm_random(seed, M, N, lanes, pad, eps, offset, mode):
    """Against the reference and the row-major kernel; NaN in the lanes past M and in the padding
    rows of x must not reach a token < M; the padding rows of out are zeroed."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) + offset).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    got, out = run_fm(to_fm(x, lanes, pad), g, b, eps, M, mode)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected(x, g, b, eps), **tolerance("layernorm", np.float32))
    np.testing.assert_allclose(got, packed(x, g, b, eps), **tolerance("layernorm", np.float32))
    if out is not None:
        np.testing.assert_array_equal(out[:, N:, :], 0.0)


@pytest.mark.parametrize("M, N, lanes", [(128, 768, 64), (100, 768, 128), (77, 1000, 32), (33, 300, 16), (5, 64, 64)])
@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (30.0, 1.0), (1e-3, 100.0)])
def test_layernorm_fm_within_a_few_ulps_of_packed(M, N, lanes, scale, offset):
    """The same algorithm as normalize_row; only the order of the sums differs (feature by feature
    here, reassociated there), which moves the normalised values by a few ulps."""
    rng = np.random.default_rng(M * N)
    x = (rng.standard_normal((M, N)) * scale + offset).astype(np.float32)
    g, b = np.ones(N, np.float32), np.zeros(N, np.float32)
    got, _ = run_fm(to_fm(x, lanes), g, b, 1e-12, M, "rows")
    assert ulps(got, packed(x, g, b, 1e-12)) <= 8


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 300),
    N=st.integers(1, 200),
    lanes=st.sampled_from([16, 32, 64, 128]),
    pad=st.integers(0, 5),
    offset=st.sampled_from([0.0, 10.0]),
)
@example(seed=0, M=128, N=768, lanes=64, pad=0, offset=0.0)
def test_layernorm_rows_fm_is_layernorm_packed_transposed(seed, M, N, lanes, pad, offset):
    """Row statistics by normalize_row's own reductions: the same bits as layernorm_packed."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, N)) + offset).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    out = np.full((-(-M // lanes), N + pad, lanes), np.nan, np.float32)
    assert layernorm_to_feature_major(x, g, b, 1e-12, out=out) is out
    np.testing.assert_array_equal(from_fm(out, M, N), packed(x, g, b, 1e-12))
    np.testing.assert_array_equal(out[:, N:, :], 0.0)


def test_layernorm_to_feature_major_allocates_an_aligned_output():
    x = np.random.default_rng(3).standard_normal((40, 50)).astype(np.float32)
    g, b = np.ones(50, np.float32), np.zeros(50, np.float32)
    out = layernorm_to_feature_major(x, g, b, lanes=32)
    assert out.shape == (2, 50, 32) and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(from_fm(out, 40, 50), packed(x, g, b, 1e-12))


@pytest.mark.parametrize("mode", ["fm", "rows", "inplace"])
def test_layernorm_fm_of_near_constant_and_constant_rows(mode):
    """A spread of 1e-6 around 1e3 (the mean's float32 tail matters) and exactly constant tokens
    (the output is beta)."""
    rng = np.random.default_rng(6)
    M, N = 70, 96
    x = (1e3 + 1e-6 * rng.standard_normal((M, N)) * 1e3).astype(np.float32)
    x[::7] = np.float32(1e3) + np.float32(rng.standard_normal())
    g = rng.standard_normal(N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    got, _ = run_fm(to_fm(x, 32), g, b, 1e-12, M, mode)
    np.testing.assert_allclose(got, expected(x, g, b, 1e-12), **tolerance("layernorm", np.float32))
    np.testing.assert_array_equal(got[::7], np.broadcast_to(b, got[::7].shape))
    gp, bp = np.ones(N, np.float32), np.zeros(N, np.float32)
    got1, _ = run_fm(to_fm(x, 32), gp, bp, 1e-12, M, mode)
    assert ulps(got1, packed(x, gp, bp, 1e-12)) <= 8


@pytest.mark.parametrize("mode", ["fm", "rows", "both", "inplace"])
@pytest.mark.parametrize("scale", [1e18, 1e25, 1e36])
def test_layernorm_fm_of_huge_values_takes_the_float64_path(scale, mode):
    """Tokens whose float32 squares overflow are normalised in float64, their neighbours in the
    same vector in float32: both as in layernorm_packed."""
    rng = np.random.default_rng(5)
    M, N = 40, 50
    x = rng.standard_normal((M, N)).astype(np.float32)
    x[[1, 17, 39]] *= np.float32(scale)
    g, b = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    got, _ = run_fm(to_fm(x, 32, 2), g, b, 1e-12, M, mode)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected(x, g, b, 1e-12), **tolerance("layernorm", np.float32))
    gp, bp = np.ones(N, np.float32), np.zeros(N, np.float32)
    got1, _ = run_fm(to_fm(x, 32, 2), gp, bp, 1e-12, M, mode)
    assert ulps(got1, packed(x, gp, bp, 1e-12)) <= 8
    np.testing.assert_array_equal(from_fm(layernorm_to_feature_major(x, g, b, lanes=32), M, N), packed(x, g, b, 1e-12))


@pytest.mark.parametrize("mode", ["fm", "rows", "both", "inplace", "from_rows"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_layernorm_fm_non_finite_input_spoils_only_its_token(bad, mode):
    rng = np.random.default_rng(2)
    M, N = 45, 50
    x = rng.standard_normal((M, N)).astype(np.float32)
    x[19, 10] = bad
    g, b = np.ones(N, np.float32), np.zeros(N, np.float32)
    if mode == "from_rows":
        got = from_fm(layernorm_to_feature_major(x, g, b, 1e-5, lanes=16), M, N)
    else:
        got, _ = run_fm(to_fm(x, 16), g, b, 1e-5, M, mode)
    ref = packed(x, g, b, 1e-5)
    assert np.isnan(got[19]).all() and np.isnan(ref[19]).all()
    assert np.isfinite(np.delete(got, 19, axis=0)).all()
    if mode == "from_rows":
        np.testing.assert_array_equal(got, ref)
    else:
        assert ulps(np.delete(got, 19, axis=0), np.delete(ref, 19, axis=0)) <= 8


def test_layernorm_fm_ignores_garbage_past_the_last_token():
    """Lanes past M (inf, NaN, huge) only ever reach lanes past M, and never the float64 path."""
    rng = np.random.default_rng(7)
    M, N = 70, 40
    x = rng.standard_normal((M, N)).astype(np.float32)
    g, b = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    xt = to_fm(x, 64, 1, fill=np.inf)
    xt[1, :, 7:20] = np.nan
    xt[1, :, 20:] = 3e38
    xt[:, N, :] = np.nan  # a padding row of x is never read
    for mode in ("fm", "rows", "both", "inplace"):
        got, _ = run_fm(xt.copy(), g, b, 1e-12, M, mode)
        ref, _ = run_fm(to_fm(x, 64, 1, fill=0.0), g, b, 1e-12, M, mode)
        np.testing.assert_array_equal(got, ref)


def test_layernorm_fm_in_place_and_to_rows_at_once():
    """Two tokens take the float64 path: their inputs must outlive the float32 pass over x."""
    rng = np.random.default_rng(1)
    M, N = 128, 768
    x = rng.standard_normal((M, N)).astype(np.float32)
    x[[3, 100]] *= np.float32(1e30)
    g, b = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    xt = to_fm(x, 64, 16)
    rows = np.empty((M, N), np.float32)
    out, rows_out = layernorm_feature_major(xt, g, b, M, out=xt, rows_out=rows)
    assert out is xt and rows_out is rows
    np.testing.assert_array_equal(from_fm(xt, M, N), rows)
    np.testing.assert_array_equal(xt[:, N:], 0.0)
    np.testing.assert_allclose(rows, expected(x, g, b, 1e-12), **tolerance("layernorm", np.float32))


def test_layernorm_fm_of_no_tokens():
    g, b = np.ones(7, np.float32), np.zeros(7, np.float32)
    out, rows = layernorm_feature_major(np.zeros((1, 7, 16), np.float32), g, b, 0, rows_out=np.zeros((0, 7), np.float32))
    assert out is None and rows.shape == (0, 7)
    assert layernorm_to_feature_major(np.zeros((0, 7), np.float32), g, b).shape == (0, 7, 64)


def _fm_call(**kw):
    x = np.zeros((2, 10, 16), np.float32)
    args = {"x": x, "gamma": np.ones(10, np.float32), "beta": np.zeros(10, np.float32), "M": 20, "out": np.zeros_like(x)}
    args.update(kw)
    return layernorm_feature_major(**args)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"x": np.zeros((2, 10, 16), np.float64)}, "float32"),
        ({"x": np.zeros((20, 10), np.float32)}, "float32 array"),
        ({"x": np.zeros((2, 16, 10), np.float32).transpose(0, 2, 1)}, "C-contiguous"),
        ({"x": np.zeros((2, 10, 24), np.float32), "out": None, "rows_out": np.zeros((20, 10), np.float32)}, "multiple of 16"),
        ({"gamma": np.ones(11, np.float32), "beta": np.zeros(11, np.float32)}, "features"),
        ({"beta": np.zeros(9, np.float32)}, r"gamma / beta"),
        ({"M": 33}, "fewer than M"),
        ({"M": -1}, "non-negative"),
        ({"M": 2.0}, "non-negative int"),
        ({"out": None}, "neither"),
        ({"out": np.zeros((2, 10, 32), np.float32)}, "out must be"),
        ({"out": np.zeros((1, 10, 16), np.float32)}, "out must be"),
        ({"out": np.zeros((2, 9, 16), np.float32)}, "out must be"),
        ({"rows_out": np.zeros((20, 11), np.float32)}, "rows_out must be"),
        ({"rows_out": np.zeros((20, 10), np.float64)}, "rows_out must be"),
    ],
)
def test_layernorm_feature_major_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _fm_call(**kw)


def test_layernorm_feature_major_rejects_overlapping_outputs():
    x = np.zeros((3, 10, 16), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _fm_call(x=x[:2], out=x[1:])
    with pytest.raises(ValueError, match="overlap"):
        _fm_call(x=x[:2], rows_out=x.reshape(-1)[100:300].reshape(20, 10))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"x": np.zeros((2, 3, 4), np.float32)}, "2-D"),
        ({"gamma": np.ones(9, np.float32)}, r"gamma / beta"),
        ({"lanes": 24}, "multiple of 16"),
        ({"lanes": 0}, "multiple of 16"),
        ({"out": np.zeros((2, 10, 24), np.float32)}, "multiple of 16"),
        ({"out": np.zeros((1, 10, 16), np.float32)}, "out must be"),
        ({"out": np.zeros((2, 9, 16), np.float32)}, "out must be"),
        ({"out": np.zeros((2, 10, 16), np.float64)}, "float32"),
    ],
)
def test_layernorm_to_feature_major_errors(kw, match):
    args = {"x": np.zeros((20, 10), np.float32), "gamma": np.ones(10, np.float32), "beta": np.zeros(10, np.float32)}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        layernorm_to_feature_major(**args)
