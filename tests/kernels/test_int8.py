"""Int8 kernels against NumPy: exact integer accumulation, exact per-row and per-tensor
DynamicQuantizeLinear and exact static QuantizeLinear (sparseinfer.graph.reference), and the
dequantized result against the Dense reference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels import dense as D
from sparseinfer.kernels import int8 as Q

# kernel activation code → the reference Dense `activation` attribute (both GELU kernels are erf-form)
ACTIVATION = {D.ACT_NONE: "none", D.ACT_GELU: "gelu", D.ACT_GELU_EXACT: "gelu", D.ACT_TANH: "tanh", D.ACT_RELU: "relu"}

# Dequantized float32 output vs the float64 reference on the same dequantized operands. The
# kernel rounds three times before the bias (int32 -> float32, scale_x * scale_w, the product:
# <= 3 * 2^-24 relative to z = acc * sx * sw), then adds bias, applies act (the fp32 rational
# GELU: 4.2e-7 absolute) and adds the residual (one rounding each). Bound per element:
#     |out - ref| <= INT8_RTOL * (|z| + |bias| + |residual|) + INT8_ATOL
# (relative to the terms, not the result, which can cancel to ~0). The integer paths are exact.
INT8_RTOL = 5e-7
INT8_ATOL = 1e-6


def quantize(x):
    """quantize_rows into outputs pre-filled with a sentinel, so that a missed write shows."""
    M, K = x.shape
    xq = np.full((M, Q.padded_k(K)), 77, np.uint8)
    scale = np.full(M, np.nan, np.float32)
    zp = np.full(M, 77, np.uint8)
    Q.quantize_rows(np.ascontiguousarray(x, np.float32), xq, scale, zp)
    return xq, scale, zp


def acc_reference(xq, zp, Wq):
    """(xq - zp) @ Wq in int64 over the real K columns."""
    K = Wq.shape[0]
    return (xq[:, :K].astype(np.int64) - zp.astype(np.int64)[:, None]) @ Wq.astype(np.int64)


# --------------------------------------------------------------------------- activation quantization


def _rows(rng, M, K, kind):
    x = rng.standard_normal((M, K)).astype(np.float32) * np.float32(10.0 ** rng.uniform(-6, 6))
    if kind == "zero_rows":
        x[rng.random(M) < 0.5] = 0.0
    elif kind == "positive":
        x = np.abs(x)
    elif kind == "negative":
        x = -np.abs(x)
    elif kind == "constant":
        x[:] = x[:, :1] if K else x
    elif kind == "ties":  # values on exact .5 steps of the scale: half-to-even rounding decides
        x = (rng.integers(-20, 21, (M, K)) * 0.5).astype(np.float32)
    elif kind == "extreme":
        x = rng.choice(np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, 0.0], np.float32), (M, K))
    return x


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(0, 20),
    K=st.integers(0, 90),
    kind=st.sampled_from(["random", "zero_rows", "positive", "negative", "constant", "ties", "extreme"]),
)
@example(seed=0, M=1, K=1, kind="random")
@example(seed=1, M=3, K=33, kind="ties")
def test_quantize_rows_is_per_row_dynamic_quantize_linear(seed, M, K, kind):
    x = _rows(np.random.default_rng(seed), M, K, kind)
    xq, scale, zp = quantize(x)
    for r in range(M):
        y, s, z = reference.dynamic_quantize_linear(x[r])
        np.testing.assert_array_equal(xq[r, :K], y)
        assert scale[r] == s and scale[r].tobytes() == np.float32(s).tobytes()
        assert zp[r] == z
        assert (xq[r, K:] == zp[r]).all()  # padding dequantizes to 0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 12),
    K=st.integers(1, 90),
    kind=st.sampled_from(["random", "positive", "negative", "ties"]),
)
def test_quantize_dequantize_error_is_at_most_half_a_step(seed, M, K, kind):
    # |x - (xq - zp) * scale| <= scale / 2, up to the float32 rounding of x / scale (|x| * 2^-24)
    x = _rows(np.random.default_rng(seed), M, K, kind).astype(np.float64)
    xq, scale, zp = quantize(x)
    s = scale.astype(np.float64)[:, None]
    err = np.abs(x - (xq[:, :K].astype(np.float64) - zp[:, None]) * s)
    assert (err <= s / 2 * (1 + 1e-6) + np.abs(x) * 2.0**-23).all()


def _sentinel_outputs(M, K):
    return np.full((M, Q.padded_k(K)), 77, np.uint8), np.full(M, np.nan, np.float32), np.full(M, 77, np.uint8)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(0, 20),
    K=st.integers(0, 90),
    kind=st.sampled_from(["random", "zero_rows", "positive", "negative", "constant", "ties", "extreme"]),
)
@example(seed=1, M=3, K=5, kind="zero_rows")
def test_quantize_tensor_is_dynamic_quantize_linear_of_the_whole_tensor(seed, M, K, kind):
    x = _rows(np.random.default_rng(seed), M, K, kind)
    if kind == "zero_rows" and seed % 2:
        x[:] = 0.0  # the whole tensor: scale 0
    xq, scale, zp = _sentinel_outputs(M, K)
    Q.quantize_tensor(np.ascontiguousarray(x), xq, scale, zp)
    y, s, z = reference.dynamic_quantize_linear(x)
    np.testing.assert_array_equal(xq[:, :K], y)
    assert (scale.view(np.uint32) == np.float32(s).view(np.uint32)).all() and (zp == z).all()
    assert (xq[:, K:] == z).all()  # padding dequantizes to 0


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(0, 12),
    K=st.integers(0, 70),
    kind=st.sampled_from(["random", "positive", "negative", "ties", "extreme"]),
    scale=st.sampled_from([1e-3, 0.02, 0.5, 1.0, 3.0]),
    signed=st.booleans(),
)
def test_quantize_static_is_quantize_linear(seed, M, K, kind, scale, signed):
    # uint8 QuantizeLinear with a fixed scale and zero point; an int8 one (zero point z) is the same
    # kernel with zero point z + 128: sat_i8(v) + 128 == sat_u8(v + 128)
    rng = np.random.default_rng(seed)
    x = _rows(rng, M, K, kind)
    s = np.float32(scale)
    z = np.int8(rng.integers(-128, 128)) if signed else np.uint8(rng.integers(0, 256))
    xq, qs, qz = _sentinel_outputs(M, K)
    zu = np.uint8(int(z) + 128) if signed else z
    Q.quantize_static(np.ascontiguousarray(x), xq, qs, qz, s, zu)
    want = reference.quantize_linear(x, s, np.array(z))
    got = (xq[:, :K].astype(np.int16) - 128).astype(np.int8) if signed else xq[:, :K]
    np.testing.assert_array_equal(got, want)
    assert (qs == s).all() and (qz == zu).all() and (xq[:, K:] == zu).all()


# --------------------------------------------------------------------------- weights


def test_quantize_weight_and_layout():
    rng = np.random.default_rng(3)
    K, N = 37, 70  # K not a multiple of 4, N not a multiple of NR
    W = rng.standard_normal((K, N)).astype(np.float32)
    W[:, 5] = 0.0  # an all-zero column: scale 0
    W[3, 6] = -np.abs(W[:, 6]).max() - 1  # the column's extreme is negative
    packed, scale, colsum = Q.pack_weight_int8(W)
    amax = np.abs(W.astype(np.float64)).max(axis=0)
    np.testing.assert_array_equal(scale, (amax / 127).astype(np.float32))
    Wq = np.clip(np.rint(W / np.where(scale > 0, scale, 1).astype(np.float64)), -127, 127)
    assert Wq[3, 6] == -127 and not Wq[:, 5].any()
    np.testing.assert_array_equal(colsum, Wq.sum(axis=0))
    assert np.all(np.abs(W - Wq * scale.astype(np.float64)) <= scale / 2 * (1 + 1e-6))
    assert packed.shape == (3, Q.padded_k(K) // 4, Q.NR, 4) and packed.ctypes.data % 64 == 0
    for p in range(3):
        for g in range(packed.shape[1]):
            for j in range(Q.NR):
                for i in range(4):
                    k, n = 4 * g + i, p * Q.NR + j
                    assert packed[p, g, j, i] == (Wq[k, n] if k < K and n < N else 0)


# --------------------------------------------------------------------------- exact accumulation


def _int_case(seed, M, K, N, x_kind, w_kind, zp_kind):
    rng = np.random.default_rng(seed)
    xq = rng.integers(0, 256, (M, Q.padded_k(K)), dtype=np.uint8)
    if x_kind == "max":
        xq[:] = 255
    elif x_kind == "zero":
        xq[:] = 0
    elif x_kind == "zero_rows":
        xq[rng.random(M) < 0.5] = 0
    Wq = rng.integers(-128, 128, (K, N), dtype=np.int8)
    if w_kind == "min":
        Wq[:] = -128
    elif w_kind == "max":
        Wq[:] = 127
    elif w_kind == "alternating":  # +127 / -128 in each group of 4 k: the largest pair sums
        Wq[:] = np.where(np.arange(K)[:, None] % 2 == 0, 127, -128)
    zp = {"random": rng.integers(0, 256, M), "zero": np.zeros(M), "max": np.full(M, 255)}[zp_kind].astype(np.uint8)
    if K % 4:
        xq[:, K:] = zp[:, None]
    packed, colsum = Q.pack_quantized(Wq)
    out = np.full((M, N), -7, np.int32)
    Q.matmul_int8(xq, zp, packed, colsum, out)
    np.testing.assert_array_equal(out, acc_reference(xq, zp, Wq))


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 40),
    K=st.integers(0, 80),
    N=st.integers(1, 100),
    x_kind=st.sampled_from(["random", "max", "zero", "zero_rows"]),
    w_kind=st.sampled_from(["random", "min", "max", "alternating"]),
    zp_kind=st.sampled_from(["random", "zero", "max"]),
)
@example(seed=0, M=1, K=1, N=1, x_kind="max", w_kind="min", zp_kind="zero")
@example(seed=1, M=9, K=7, N=33, x_kind="max", w_kind="max", zp_kind="zero")  # pmaddubsw would saturate
@example(seed=2, M=17, K=70, N=65, x_kind="zero", w_kind="min", zp_kind="max")
def test_matmul_int8_is_exact(seed, M, K, N, x_kind, w_kind, zp_kind):
    _int_case(seed, M, K, N, x_kind, w_kind, zp_kind)


@pytest.mark.parametrize("M", [1, 7, 8, 9, 255, 256, 257, 300])
def test_matmul_int8_row_chunks(M):
    # crosses the MR (8) and MC (256) blocking boundaries
    _int_case(M, M, 67, 65, "random", "random", "random")


@pytest.mark.parametrize(("x_kind", "w_kind", "zp_kind"), [("max", "min", "zero"), ("zero", "min", "max"), ("max", "max", "zero")])
def test_matmul_int8_at_max_k_reaches_the_int32_limits_exactly(x_kind, w_kind, zp_kind):
    # 255 * 128 * MAX_K = 2147483520: one step below int32 overflow, in the accumulator (xq = 255)
    # or in the zero-point term (xq = 0, zp = 255)
    _int_case(0, 9, Q.MAX_K, 33, x_kind, w_kind, zp_kind)


# --------------------------------------------------------------------------- dequantized result


def _dense_case(seed, M, K, N, use_bias, use_res, act, x_kind="random"):
    rng = np.random.default_rng(seed)
    X = _rows(rng, M, K, x_kind) if x_kind != "random" else rng.uniform(-2, 2, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    xq, xs, xzp = quantize(X)
    packed, ws, colsum = Q.pack_weight_int8(W)
    out = np.full((M, N), np.nan, np.float32)
    Q.dense_int8(xq, xs, xzp, packed, ws, colsum, bias, res, out, act)
    # the reference Dense on the dequantized operands, in float64 (both are exact in float64)
    Wq, _ = Q.quantize_weight(W)
    xd = (xq[:, :K].astype(np.float64) - xzp[:, None]) * xs.astype(np.float64)[:, None]
    wd = Wq.astype(np.float64) * ws.astype(np.float64)
    ref = reference.dense(xd, wd, bias, res, activation=ACTIVATION[act])
    z = np.abs(xd @ wd)
    bound = INT8_RTOL * (z + (np.abs(bias) if use_bias else 0) + (np.abs(res) if use_res else 0)) + INT8_ATOL
    err = np.abs(out - ref)
    assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g} at {np.unravel_index(np.argmax(err - bound), err.shape)}"
    return X, W, out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 40),
    K=st.integers(0, 70),
    N=st.integers(1, 100),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from(sorted(ACTIVATION)),
    x_kind=st.sampled_from(["random", "zero_rows", "positive", "constant"]),
)
@example(seed=0, M=1, K=1, N=1, use_bias=True, use_res=True, act=D.ACT_GELU, x_kind="random")
@example(seed=1, M=9, K=33, N=65, use_bias=False, use_res=False, act=D.ACT_NONE, x_kind="random")
def test_dense_int8_matches_reference_on_dequantized_operands(seed, M, K, N, use_bias, use_res, act, x_kind):
    _dense_case(seed, M, K, N, use_bias, use_res, act, x_kind)


@pytest.mark.parametrize(("K", "N"), [(768, 768), (768, 2304), (3072, 768)])
def test_dense_int8_bert_shapes(K, N):
    _dense_case(K + N, 128, K, N, True, True, D.ACT_GELU)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), K=st.integers(1, 300), N=st.integers(1, 70))
def test_dense_int8_is_within_the_quantization_bound_of_the_float_product(seed, M, K, N):
    # x = xd + ex, w = wd + ew with |ex| <= sx / 2, |ew| <= sw / 2, so
    # |x @ w - xd @ wd| <= |x| @ sw / 2 + sx / 2 @ |w| + K * sx * sw / 4 (+ the kernel's rounding)
    X, W, out = _dense_case(seed, M, K, N, False, False, D.ACT_NONE)
    _, xs, _ = quantize(X)
    _, ws = Q.quantize_weight(W)
    sx, sw = xs.astype(np.float64)[:, None], ws.astype(np.float64)[None, :]
    bound = np.abs(X.astype(np.float64)).sum(1, keepdims=True) * sw / 2 + sx / 2 * np.abs(W.astype(np.float64)).sum(0)
    bound = bound * (1 + 1e-5) + K * sx * sw / 4 + INT8_ATOL
    assert (np.abs(out - reference.dense(X.astype(np.float64), W.astype(np.float64))) <= bound).all()


def test_dense_int8_out_may_be_the_residual():
    rng = np.random.default_rng(11)
    X = rng.uniform(-1, 1, (19, 45)).astype(np.float32)
    W = rng.uniform(-1, 1, (45, 70)).astype(np.float32)
    res = rng.uniform(-1, 1, (19, 70)).astype(np.float32)
    xq, xs, xzp = quantize(X)
    packed, ws, colsum = Q.pack_weight_int8(W)
    expect = Q.dense_int8(xq, xs, xzp, packed, ws, colsum, None, res.copy(), act=D.ACT_GELU)
    Q.dense_int8(xq, xs, xzp, packed, ws, colsum, None, res, res, act=D.ACT_GELU)
    np.testing.assert_array_equal(res, expect)


def test_dense_int8_empty_operands():
    """M = 0 gives an empty output; K = 0 gives act(bias) + residual."""
    rng = np.random.default_rng(5)
    bias = rng.uniform(-1, 1, 40).astype(np.float32)
    for M, K in ((0, 7), (5, 0)):
        X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
        W = rng.uniform(-1, 1, (K, 40)).astype(np.float32)
        res = rng.uniform(-1, 1, (M, 40)).astype(np.float32)
        xq, xs, xzp = quantize(X)
        packed, ws, colsum = Q.pack_weight_int8(W)
        out = Q.dense_int8(xq, xs, xzp, packed, ws, colsum, bias, res, act=D.ACT_GELU)
        np.testing.assert_allclose(out, reference.dense(X, W, bias, res, activation="gelu"), rtol=1e-6, atol=INT8_ATOL)


def test_dense_int8_rejects_mismatched_operands():
    packed, ws, colsum = Q.pack_weight_int8(np.ones((10, 40), np.float32))
    xq, xs, xzp = quantize(np.ones((3, 10), np.float32))
    with pytest.raises(ValueError, match="padded"):
        Q.dense_int8(xq[:, :8].copy(), xs, xzp, packed, ws, colsum)
    with pytest.raises(ValueError, match="uint8"):
        Q.dense_int8(xq.astype(np.int8), xs, xzp, packed, ws, colsum)
    with pytest.raises(ValueError, match="too large"):
        Q.pack_quantized(np.zeros((Q.MAX_K + 1, 1), np.int8))


# --------------------------------------------------------------------------- code generation

PROBE = r"""
import json, collections
import numpy as np
from sparseinfer.kernels import int8 as Q
rng = np.random.default_rng(0)
ok = True
for M, K, N in ((1, 1, 1), (9, 7, 33), (19, 70, 65), (300, 131, 40)):
    xq = rng.integers(0, 256, (M, Q.padded_k(K)), dtype=np.uint8)
    zp = rng.integers(0, 256, M).astype(np.uint8)
    Wq = rng.integers(-128, 128, (K, N), dtype=np.int8)
    packed, colsum = Q.pack_quantized(Wq)
    ref = (xq[:, :K].astype(np.int64) - zp[:, None]) @ Wq.astype(np.int64)
    ok &= bool(np.array_equal(Q.matmul_int8(xq, zp, packed, colsum), ref))
asm = "\n".join(Q.dense_int8_packed.inspect_asm().values())
ops = collections.Counter(line.split()[0] for line in asm.splitlines() if line.startswith("\tv"))
stats = Q.dense_int8_packed.stats
print(json.dumps({"ok": ok, "instruction": Q.DOT_INSTRUCTION, "ops": ops,
                  "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def _probe(tmp_path, features=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    if features is not None:
        env["NUMBA_CPU_FEATURES"] = features
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def portable_features(drop):
    """The host's CPU features (NUMBA_CPU_FEATURES form) without AVX512-VNNI (``drop="vnni"``) or
    without any AVX-512 (``drop="avx512"``); skips the test on a host without AVX2."""
    from numba.core.registry import cpu_target

    feats = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    if drop == "vnni":
        feats = [f"-{f[1:]}" if f in ("+avx512vnni", "+avxvnni") else f for f in feats]
    else:
        feats = [f"-{f[1:]}" if f.startswith("+avx512") or f == "+avxvnni" else f for f in feats]
    if "+avx2" not in feats:
        pytest.skip("host without AVX2")
    return ",".join(feats)


@pytest.mark.slow
def test_host_kernel_uses_vnni_when_available_and_loads_from_the_cache(tmp_path):
    cold = _probe(tmp_path)
    assert cold["ok"] and cold["misses"] > 0
    if Q.HAS_VNNI:
        assert cold["instruction"] == "vpdpbusd" and cold["ops"].get("vpdpbusd", 0) >= 16
        assert "vpdpbusds" not in cold["ops"]  # the saturating form would be wrong
    warm = _probe(tmp_path)  # inspect_asm is unavailable for cached code; only the counts matter here
    assert warm["ok"] and warm["hits"] > 0 and warm["misses"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("drop", ["vnni", "avx512"])
def test_portable_fallback_is_exact(tmp_path, drop):
    """Without AVX512-VNNI (or without any AVX-512) the generic IR compiles to vpmaddwd and stays exact."""
    got = _probe(tmp_path, portable_features(drop))
    assert got["ok"] and got["instruction"] == "vpmaddwd"
    assert got["ops"].get("vpmaddwd", 0) > 0 and "vpdpbusd" not in got["ops"]
