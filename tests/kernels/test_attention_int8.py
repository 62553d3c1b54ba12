"""int8 attention kernel: exact tests of its quantization, packing and integer products, and its
output against the NumPy fp32 reference within a tolerance derived from the quantization steps.

Tolerance (per output element; rigorous, computed from the data, see ``bound``). The kernel
computes ``out = sum_j eq_j vhat_j / (255 sum_j e~_j)`` where ``qhat, khat, vhat`` are the
dequantized operands (checked bit-exactly against the quantization formulas below),
``shat = qhat khat^T scale + mask``, ``e~_j`` its fp32 ``exp(shat_j - max)`` (a polynomial, 8.6e-5
relative) and ``eq_j = rint(255 e~_j)``, so ``|eq_j / 255 - e~_j| <= 1/510``. With ``phat`` the exact
softmax of ``shat`` and ``p`` the reference's:

    out - ref = sum_j (eq_j/255 - e~_j) vhat_j / sum e~       <= sum_j |vhat_j| / (510 sum e~)  [e step]
              + sum_j (e~_j / sum e~ - phat_j) vhat_j           <= (2.5e-4 + fp32 score rounding) max |vhat|
              + sum_j (phat_j - p_j) vhat_j                     <= sum_j |phat_j - p_j| |vhat_j|  [Q, K steps]
              + sum_j p_j (vhat_j - v_j)                        <= sum_j p_j |vhat_j - v_j|       [V step]

The last two terms are evaluated exactly from the kernel's quantized operands (their size is the
Q / K / V quantization error, ~1 % of the output on random data); the first two bound what the
kernel adds on top of the exact attention of those operands, and are also checked alone
(``out`` against ``phat @ vhat``).
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.kernels.attention import attention
from sparseinfer.kernels.attention_int8 import (
    KB,
    attention_int8,
    attention_int8_fm,
    make_workspace,
    matmul_u8s8,
    pack_keys,
    pack_values,
    quantize_head,
)
from tests.kernels.test_attention import expected, make_mask
from tests.kernels.test_int8 import portable_features

F32_MIN = np.finfo(np.float32).min
F32 = np.float32
TWO64 = F32(2.0**64)


# ---------------------------------------------------------------- the quantization, in NumPy


def quantize_symmetric(x, axis):
    """int8 [-127, 127] per slice along ``axis`` (max |x| / 127), in the kernel's float32 arithmetic."""
    amax = np.abs(x).max(axis=axis, keepdims=True)
    pre = np.where(amax < F32(2.0**-64), TWO64, F32(1.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F32(127.0) / (amax * pre), F32(0.0)).astype(np.float32)
    xq = np.clip(np.rint((x * pre) * inv), -127, 127).astype(np.int8)
    return xq, (amax / F32(127.0)).astype(np.float32).squeeze(axis)


def quantize_rows_u8(x):
    """uint8 per row with a zero point (the range [min(x, 0), max(x, 0)] onto [0, 255])."""
    lo = np.minimum(x.min(axis=1), F32(0.0))
    hi = np.maximum(x.max(axis=1), F32(0.0))
    rng = (hi - lo).astype(np.float32)
    pre = np.where(rng < F32(2.0**-64), TWO64, F32(1.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(rng > 0, F32(255.0) / (rng * pre), F32(0.0)).astype(np.float32)
    zp = np.clip(np.rint(((-lo) * pre) * inv), 0, 255).astype(np.float32)
    xq = np.clip(np.rint((x * pre[:, None]) * inv[:, None]) + zp[:, None], 0, 255).astype(np.uint8)
    scale = (rng.astype(np.float64) / 255.0).astype(np.float32)
    return xq, scale, zp.astype(np.int32)


def head_slices(q, k, v, S, D, cols, b, h):
    rows = slice(b * S, (b + 1) * S)
    return tuple(a[rows, c + h * D : c + (h + 1) * D] for a, c in zip((q, k, v), cols))


# ---------------------------------------------------------------- exact tests


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    S=st.integers(1, 70),
    D=st.integers(1, 70),
    data=st.sampled_from(["normal", "zero_rows", "positive", "huge", "tiny", "subnormal"]),
)
@example(seed=0, S=1, D=1, data="normal")
@example(seed=1, S=33, D=7, data="zero_rows")
@example(seed=2, S=16, D=64, data="subnormal")
@example(seed=3, S=70, D=64, data="zero_rows")  # the vector forms: K for D % 64 == 0, Q and V for D % 16 == 0
@example(seed=4, S=33, D=128, data="huge")
@example(seed=5, S=5, D=48, data="tiny")
@example(seed=6, S=3, D=16, data="positive")
def test_quantization_and_packing_are_exact(seed, S, D, data):
    """The kernel's quantized, packed Q / K / V (read back from its workspace) equal the formulas
    above bit for bit, padding included."""
    rng = np.random.default_rng(seed)
    H, cols = 2, (1, 2 * D + 3, 4 * D + 5)  # head 1 of 2, at odd column offsets in one buffer
    x = rng.standard_normal((S, 6 * D + 5)).astype(np.float32)
    if data == "zero_rows":
        x[rng.random(S) < 0.4] = 0.0
        x[:, rng.random(x.shape[1]) < 0.3] = 0.0
    elif data == "positive":
        x = np.abs(x)
    else:
        x *= {"normal": 1.0, "huge": 1e30, "tiny": 1e-30, "subnormal": 1e-42}[data]
    scale = F32(0.37)
    got = quantize_head(x, x, x, S, D, scale, *cols, b=0, h=1)
    Q, K, V = head_slices(x, x, x, S, D, cols, 0, 1)
    assert H * D <= x.shape[1] - max(cols)
    qq, sq, zq = quantize_rows_u8(Q)
    Dg4 = 4 * ((D + 3) // 4)
    np.testing.assert_array_equal(got["qq"], np.pad(qq, ((0, 0), (0, Dg4 - D))))
    np.testing.assert_array_equal(got["sq"], sq)
    np.testing.assert_array_equal(got["zq"], zq)
    kq, sk = quantize_symmetric(K, axis=1)
    np.testing.assert_array_equal(got["kq"], pack_keys(kq))
    Skp = got["ksum"].shape[0]
    np.testing.assert_array_equal(got["ksum"], np.pad(kq.sum(axis=1, dtype=np.int32), (0, Skp - S)))
    np.testing.assert_array_equal(got["ksc"], np.pad(sk * scale, (0, Skp - S)))
    vq, sv = quantize_symmetric(V, axis=0)
    np.testing.assert_array_equal(got["vq"], pack_values(vq))
    np.testing.assert_array_equal(got["sv"], np.pad(sv, (0, got["sv"].shape[0] - D)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), N=st.integers(1, 70), G=st.integers(1, 40))
@example(seed=0, M=1, N=1, G=1)
def test_integer_products_are_exact(seed, M, N, G):
    """The register tile on both packed layouts against the int64 product, over the whole u8 x s8
    range (255 * -128 included)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (M, 4 * G)).astype(np.uint8)
    w = rng.integers(-128, 128, (N, 4 * G)).astype(np.int8)
    a[0, :] = 255
    w[0, :] = -128
    want = a.astype(np.int64) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(matmul_u8s8(a, pack_keys(w), N), want)  # scores: rows of K
    np.testing.assert_array_equal(matmul_u8s8(a, pack_values(w.T.copy()), N), want)  # context: V [S, D]


def test_integer_products_long_reduction_do_not_saturate():
    """All-extreme operands over 4 * 1024 products: vpdpbusd (not the saturating vpdpbusds)."""
    a = np.full((3, 4096), 255, np.uint8)
    w = np.full((2, 4096), -128, np.int8)
    np.testing.assert_array_equal(matmul_u8s8(a, pack_keys(w), 2), np.full((3, 2), 255 * -128 * 4096))


# ---------------------------------------------------------------- the float result


def bound(q, k, v, mask, B, S, H, D, scale, cols, out):
    """(``|out - phat @ vhat|`` bound and ``|out - ref|`` bound), see the module docstring."""
    tol_hat = np.empty_like(out, dtype=np.float64)
    tol_ref = np.empty_like(out, dtype=np.float64)
    err_hat = np.empty_like(out, dtype=np.float64)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        m = np.zeros(S) if mask is None else mask[b].astype(np.float64)
        for h in range(H):
            oc = slice(h * D, (h + 1) * D)
            Q, K, V = (a.astype(np.float64) for a in head_slices(q, k, v, S, D, cols, b, h))
            qz = quantize_head(q, k, v, S, D, scale, *cols, b=b, h=h)
            Kg = qz["kq"].shape[0]
            kq = qz["kq"][:, :S].transpose(1, 0, 2).reshape(S, 4 * Kg).astype(np.float64)
            qd = qz["qq"].astype(np.float64) - qz["zq"][:, None]
            shat = (qd @ kq.T) * qz["sq"][:, None].astype(np.float64) * qz["ksc"][None, :S] + m
            vhat = qz["vq"].transpose(0, 2, 1).reshape(-1, qz["vq"].shape[1])[:S, :D].astype(np.float64) * qz["sv"][:D]
            e = np.exp(shat - shat.max(axis=1, keepdims=True))
            esum = e.sum(axis=1, keepdims=True)
            phat = e / esum
            s = Q @ K.T * scale + m
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            # fp32 rounding of the scores (two products, the mask sum, the max subtraction; the int32
            # -> float conversion is exact below 2^24): a few ulp of the largest visible one moves the softmax weights by at most a factor exp(2 * that)
            vis = e > 0
            srnd = 2.0**-24 * np.where(vis, 3 * np.abs(shat - m) + np.abs(shat), 0).max(axis=1, keepdims=True)
            vmax = np.abs(vhat).max(axis=0, keepdims=True)
            esum_lo = np.maximum(1.0, esum * np.exp(-2 * srnd) * (1 - 1e-4))
            hat = (np.abs(vhat).sum(axis=0, keepdims=True) / (510 * esum_lo)) + (2.5e-4 + np.expm1(2 * srnd)) * vmax
            tol_hat[rows, oc] = hat + 1e-6 * vmax
            tol_ref[rows, oc] = hat + np.abs(phat - p) @ np.abs(vhat) + p @ np.abs(vhat - V) + 1e-6 * vmax
            err_hat[rows, oc] = np.abs(out[rows, oc] - phat @ vhat)
    return tol_hat, tol_ref, err_hat


def make_data(rng, B, S, H, D, data):
    """q, k, v in one fused buffer (shuffled order, extra columns) and the scale."""
    hd = H * D
    extra = int(rng.integers(0, 5))
    qkv = rng.standard_normal((B * S, 3 * hd + extra)).astype(np.float32)
    order = rng.permutation(3)
    start = int(rng.integers(0, extra + 1))
    cols = tuple(start + int(order[i]) * hd for i in range(3))
    scale = 1.0 / np.sqrt(D)
    qs, ks = (slice(c, c + hd) for c in cols[:2])
    if data in ("zero", "zero_qk"):
        qkv[:, qs] = 0.0
        qkv[:, ks] = 0.0
        if data == "zero":
            qkv[:, cols[2] : cols[2] + hd] = 0.0
    elif data == "peaked":  # a score spread of ~5 (several near-one-hot rows)
        qkv[:, qs] *= 2.2
        qkv[:, ks] *= 2.2
    elif data == "huge":  # |q|, |k| ~ 1e18, v ~ 1e30, scale 1e-36: scores O(1)
        qkv[:, qs] *= 1e18
        qkv[:, ks] *= 1e18
        qkv[:, cols[2] : cols[2] + hd] *= 1e30
        scale = 1e-36
    elif data == "tiny":
        qkv[:, qs] *= 1e-15
        qkv[:, ks] *= 1e-15
        qkv[:, cols[2] : cols[2] + hd] *= 1e-30
        scale = 1e30
    return qkv, cols, scale


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    S=st.integers(1, 70),
    H=st.integers(1, 3),
    D=st.integers(1, 70),
    mask_kind=st.sampled_from(["none", "padded", "one_key", "real"]),
    data=st.sampled_from(["random", "peaked", "zero", "zero_qk", "huge", "tiny"]),
)
@example(seed=0, B=1, S=1, H=1, D=1, mask_kind="none", data="random")
@example(seed=1, B=2, S=9, H=3, D=33, mask_kind="padded", data="random")
@example(seed=2, B=3, S=17, H=2, D=8, mask_kind="one_key", data="zero_qk")
@example(seed=3, B=1, S=64, H=2, D=64, mask_kind="padded", data="peaked")
@example(seed=4, B=2, S=45, H=1, D=70, mask_kind="real", data="huge")
@example(seed=5, B=2, S=45, H=2, D=64, mask_kind="one_key", data="tiny")
@example(seed=6, B=1, S=19, H=3, D=32, mask_kind="real", data="peaked")
@example(seed=7, B=2, S=70, H=1, D=128, mask_kind="padded", data="zero_qk")
def test_attention_int8_against_reference(seed, B, S, H, D, mask_kind, data):
    rng = np.random.default_rng(seed)
    qkv, cols, scale = make_data(rng, B, S, H, D, data)
    mask = make_mask(rng, mask_kind, B, S)
    out = np.full((B * S, H * D), np.nan, np.float32)
    attention_int8(qkv, qkv, qkv, mask, B, S, H, D, scale=scale, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out)
    ref = expected(qkv, qkv, qkv, mask, B, S, H, D, scale, *cols)
    tol_hat, tol_ref, err_hat = bound(qkv, qkv, qkv, mask, B, S, H, D, scale, cols, out)
    assert np.isfinite(out).all()
    assert (err_hat <= tol_hat).all(), f"max excess over the e-step bound: {(err_hat - tol_hat).max()}"
    assert (np.abs(out - ref) <= tol_ref).all(), f"max excess: {(np.abs(out - ref) - tol_ref).max()}"
    if data == "zero":
        np.testing.assert_array_equal(out, 0.0)


def test_bert_shape_accuracy_and_masks():
    """BERT-base head shape with padding and a fully masked batch row (uniform weights, as the
    fp32 kernel), against the fp32 kernel: the error stays a few % of the output range."""
    rng = np.random.default_rng(3)
    B, S, H, D = 2, 128, 4, 64
    qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
    mask = np.zeros((B, S), np.float32)
    mask[1, 100:] = F32_MIN
    cols = (0, H * D, 2 * H * D)
    ws = make_workspace(S, D)
    for m in (mask, np.full((B, S), F32_MIN, np.float32)):
        out = attention_int8(qkv, qkv, qkv, m, B, S, H, D, q_col=0, k_col=H * D, v_col=2 * H * D, workspace=ws)
        ref = expected(qkv, qkv, qkv, m, B, S, H, D, 1 / 8, *cols)
        tol_hat, tol_ref, err_hat = bound(qkv, qkv, qkv, m, B, S, H, D, 1 / 8, cols, out)
        assert (err_hat <= tol_hat).all() and (np.abs(out - ref) <= tol_ref).all()
        fp32 = attention(qkv, qkv, qkv, m, B, S, H, D, q_col=0, k_col=H * D, v_col=2 * H * D)
        assert np.abs(out - fp32).max() <= 0.05 * np.abs(fp32).max()


def test_one_visible_key_copies_its_quantized_value_row():
    rng = np.random.default_rng(5)
    B, S, H, D = 3, 21, 2, 40
    mask = make_mask(rng, "one_key", B, S)
    q, k, v = (rng.standard_normal((B * S, H * D)).astype(np.float32) for _ in range(3))
    out = attention_int8(q, k, v, mask, B, S, H, D)
    for b in range(B):
        key = b * S + int(np.flatnonzero(mask[b] == 0)[0])
        for h in range(H):
            vq, sv = quantize_symmetric(v[b * S : (b + 1) * S, h * D : (h + 1) * D], axis=0)
            vhat = vq[key - b * S].astype(np.float32) * sv
            np.testing.assert_allclose(out[b * S : (b + 1) * S, h * D : (h + 1) * D], np.broadcast_to(vhat, (S, D)), rtol=1e-5)


def test_threads_and_workspace_reuse_do_not_change_the_result():
    """Every (batch, head) task is computed the same way whatever slot runs it."""
    rng = np.random.default_rng(7)
    B, S, H, D = 2, 2 * KB + 3, 3, 24
    q, k, v = (rng.standard_normal((B * S, H * D)).astype(np.float32) for _ in range(3))
    first = attention_int8(q, k, v, None, B, S, H, D)
    ws = make_workspace(S, D, nthreads=1)
    np.testing.assert_array_equal(attention_int8(q, k, v, None, B, S, H, D, workspace=ws), first)
    np.testing.assert_array_equal(attention_int8(q, k, v, None, B, S, H, D, workspace=ws), first)


def test_bad_arguments_are_reported():
    q = np.zeros((8, 16), np.float32)
    for args, match in (
        ((q, q, q, None, 2, 4, 2, 16), "does not match"),
        ((q.astype(np.float64), q, q, None, 2, 4, 2, 8), "float32"),
        ((q, q, q, np.zeros((2, 5), np.float32), 2, 4, 2, 8), "mask"),
    ):
        try:
            attention_int8(*args)
        except ValueError as exc:
            assert match in str(exc)
        else:
            raise AssertionError(f"no error for {match}")
    try:
        attention_int8(q, q, q, None, 2, 4, 2, 8, workspace=make_workspace(5, 8))
    except ValueError as exc:
        assert "workspace" in str(exc)
    else:
        raise AssertionError("no error for a mismatched workspace")


# ---------------------------------------------------------------- Q, K, V feature-major


def feature_major(qkv: np.ndarray, lanes: int) -> np.ndarray:
    """``qkv [T, N]`` in the sparse int8 kernel's chain layout: ``chain[t // lanes, n, t % lanes]``
    (the lanes past ``T`` hold garbage, which must not matter)."""
    T, N = qkv.shape
    nch = -(-T // lanes)
    chain = np.full((nch * lanes, N), np.float32(7.5e30))
    chain[:T] = qkv
    return np.ascontiguousarray(chain.reshape(nch, lanes, N).transpose(0, 2, 1))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    S=st.sampled_from([64, 128, 192]),
    H=st.integers(1, 3),
    D=st.sampled_from([64, 128]),
    lanes=st.sampled_from([16, 32, 64, 128]),
    mask_kind=st.sampled_from(["none", "padded", "one_key", "real"]),
    data=st.sampled_from(["random", "peaked", "zero", "zero_qk", "huge", "tiny"]),
)
@example(seed=0, B=1, S=128, H=2, D=64, lanes=128, mask_kind="padded", data="random")  # BERT's heads
@example(seed=1, B=3, S=64, H=1, D=128, lanes=128, mask_kind="real", data="huge")  # two batch rows per chunk
@example(seed=2, B=2, S=192, H=2, D=64, lanes=16, mask_kind="one_key", data="tiny")  # a head across 12 chunks
def test_feature_major_projection_gives_the_same_bits(seed, B, S, H, D, lanes, mask_kind, data):
    """attention_int8_fm reads Q, K, V transposed (the sparse int8 kernel's chain layout) and
    quantizes them lane-wise: the same operands, so the same result as attention_int8 on the
    row-major projection, bit for bit (which test_attention_int8_against_reference checks)."""
    rng = np.random.default_rng(seed)
    qkv, cols, scale = make_data(rng, B, S, H, D, data)
    qkv[:, int(rng.integers(0, qkv.shape[1]))] = 0.0  # a zero feature
    mask = make_mask(rng, mask_kind, B, S)
    ref = attention_int8(qkv, qkv, qkv, mask, B, S, H, D, scale=scale, q_col=cols[0], k_col=cols[1], v_col=cols[2])
    out = np.full_like(ref, np.nan)
    chain = feature_major(qkv, lanes)
    attention_int8_fm(chain, mask, B, S, H, D, scale=scale, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out)
    np.testing.assert_array_equal(out, ref)


def test_feature_major_bad_arguments_are_reported():
    chain = np.zeros((1, 3 * 64, 128), np.float32)
    for args, kwargs, match in (
        ((chain, None, 1, 48, 1, 64), {}, "multiples of 64"),
        ((chain, None, 1, 64, 1, 32), {}, "multiples of 64"),
        ((chain.astype(np.float64), None, 1, 64, 1, 64), {}, "float32"),
        ((np.zeros((1, 192, 24), np.float32), None, 1, 64, 1, 64), {}, "multiple of 16"),
        ((chain, None, 2, 128, 1, 64), {}, "fewer than"),
        ((chain, None, 1, 64, 1, 64), {"v_col": 160}, "exceeds"),
        ((chain, np.zeros((1, 5), np.float32), 1, 64, 1, 64), {}, "mask"),
        ((chain, None, 1, 64, 1, 64), {"workspace": make_workspace(128, 64)}, "workspace"),
    ):
        with pytest.raises(ValueError, match=match):
            attention_int8_fm(*args, **kwargs)


# ---------------------------------------------------------------- the portable build

PROBE = r"""
import sys
import numpy as np
from sparseinfer.kernels.attention_int8 import attention_int8, quantize_head
from tests.kernels.test_attention import make_mask
rng = np.random.default_rng(0)
res = {}
for B, S, H, D in ((2, 45, 2, 64), (1, 128, 2, 64), (2, 21, 2, 48), (2, 19, 2, 24)):
    qkv = rng.standard_normal((B * S, 3 * H * D + 3)).astype(np.float32)
    mask = make_mask(rng, "padded", B, S)
    key = f"{B}_{S}_{H}_{D}"
    res["out_" + key] = attention_int8(qkv, qkv, qkv, mask, B, S, H, D, q_col=1, k_col=H * D + 2, v_col=2 * H * D + 3)
    for name, a in quantize_head(qkv, qkv, qkv, S, D, 0.125, 1, H * D + 2, 2 * H * D + 3, b=B - 1, h=1).items():
        res[name + "_" + key] = a
np.savez(sys.argv[1], **res)
"""


def _probe(tmp_path, name, features=None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"numba-cache-{name}"))
    if features is not None:
        env["NUMBA_CPU_FEATURES"] = features
    path = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(path))


@pytest.mark.slow
@pytest.mark.parametrize("drop", ["vnni", "avx512"])
def test_portable_build_matches_the_host_build(tmp_path, drop):
    """Without AVX512-VNNI (or without any AVX-512: the <16 x float> / <16 x i32> code is split
    by LLVM, the byte stores lose ``vpmovdb``) the quantized operands are bit-identical to the
    host build's and the output agrees to fp32 rounding (only the order of the row sums may differ)."""
    features = portable_features(drop)
    host = _probe(tmp_path, "host")
    port = _probe(tmp_path, drop, features)
    assert host.keys() == port.keys()
    for name, a in host.items():
        if name.startswith("out_"):
            np.testing.assert_allclose(port[name], a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=name)
        else:
            np.testing.assert_array_equal(port[name], a, err_msg=name)
