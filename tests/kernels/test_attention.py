"""Fused multi-head attention vs plain NumPy."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.kernels.attention import attention, make_workspace


def attention_ref(q, k, v, mask, B, S, H, D, scale, q_col=0, k_col=0, v_col=0):
    out = np.empty((B * S, H * D), np.float64)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        for h in range(H):
            Q = q[rows, q_col + h * D : q_col + (h + 1) * D].astype(np.float64)
            K = k[rows, k_col + h * D : k_col + (h + 1) * D].astype(np.float64)
            V = v[rows, v_col + h * D : v_col + (h + 1) * D].astype(np.float64)
            s = Q @ K.T * scale
            if mask is not None:
                s = s + mask[b][None, :]
            s = s - s.max(-1, keepdims=True)
            p = np.exp(s)
            p = p / p.sum(-1, keepdims=True)
            out[rows, h * D : (h + 1) * D] = p @ V
    return out


def _mask(rng, B, S):
    keep = rng.random((B, S)) < 0.8
    keep[:, 0] = True
    return np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    S=st.integers(1, 45),
    H=st.integers(1, 4),
    D=st.integers(1, 70),
    use_mask=st.booleans(),
    fused=st.booleans(),
)
def test_attention_random(seed, B, S, H, D, use_mask, fused):
    rng = np.random.default_rng(seed)
    mask = _mask(rng, B, S) if use_mask else None
    scale = 1.0 / np.sqrt(D)
    if fused:
        qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
        out = attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=0, k_col=H * D, v_col=2 * H * D)
        ref = attention_ref(qkv, qkv, qkv, mask, B, S, H, D, scale, 0, H * D, 2 * H * D)
    else:
        q, k, v = (rng.standard_normal((B * S, H * D)).astype(np.float32) for _ in range(3))
        out = attention(q, k, v, mask, B, S, H, D)
        ref = attention_ref(q, k, v, mask, B, S, H, D, scale)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.sqrt(D)))


def test_attention_bert_shape_fully_masked_row():
    rng = np.random.default_rng(3)
    B, S, H, D = 2, 128, 12, 64
    qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
    mask = np.zeros((B, S), np.float32)
    mask[1, 100:] = np.finfo(np.float32).min
    ws = make_workspace(S, D)
    out = np.empty((B * S, H * D), np.float32)
    attention(qkv, qkv, qkv, mask, B, S, H, D, k_col=H * D, v_col=2 * H * D, out=out, workspace=ws)
    ref = attention_ref(qkv, qkv, qkv, mask, B, S, H, D, 1 / 8.0, 0, H * D, 2 * H * D)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    # every key masked: uniform attention (same as torch / onnxruntime with finfo.min)
    mask[:] = np.finfo(np.float32).min
    attention(qkv, qkv, qkv, mask, B, S, H, D, k_col=H * D, v_col=2 * H * D, out=out, workspace=ws)
    ref = attention_ref(qkv, qkv, qkv, mask, B, S, H, D, 1 / 8.0, 0, H * D, 2 * H * D)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
