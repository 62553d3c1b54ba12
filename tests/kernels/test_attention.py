"""Fused multi-head attention kernel against the Attention op of the NumPy reference."""

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels.attention import attention, make_workspace
from tests.tolerances import tolerance

F32_MIN = np.finfo(np.float32).min  # the additive "masked" value exporters write (-3.4e38)


def expected(q, k, v, mask, B, S, H, D, scale, q_col=0, k_col=0, v_col=0):
    """The reference on the kernel's 2-D layout: rows [B*S] → [B, S], mask [B, S] → [B, 1, 1, S]."""
    m = None if mask is None else mask.reshape(B, 1, 1, S)
    out = reference.attention(
        *(t.reshape(B, S, -1) for t in (q, k, v)),
        m,
        num_heads=H,
        scale=scale,
        hidden=H * D,
        q_offset=q_col,
        k_offset=k_col,
        v_offset=v_col,
    )
    return out.reshape(B * S, H * D)


def make_mask(rng, kind, B, S):
    """none; padded (right padding, row b loses more keys than row b-1, at least one key kept);
    one_key (every key but one masked, a different one per row); real (arbitrary additive values)."""
    if kind == "none":
        return None
    if kind == "real":
        return rng.uniform(-5, 5, (B, S)).astype(np.float32)
    mask = np.full((B, S), F32_MIN, np.float32)
    for b in range(B):
        if kind == "padded":
            mask[b, : max(1, S - (b * S) // (B + 1))] = 0.0
        else:
            mask[b, rng.integers(S)] = 0.0
    return mask


def run_both(rng, B, S, H, D, mask, layout, data="random"):
    """Run the kernel and the reference on the same operands. layout: "separate" Q, K, V arrays, or
    one fused [B*S, W] buffer holding Q, K, V at column offsets (in a shuffled order, W >= 3*H*D)."""
    hd = H * D
    scale = 1.0 / np.sqrt(D)
    if layout == "separate":
        q, k, v = (rng.standard_normal((B * S, hd)).astype(np.float32) for _ in range(3))
        cols = (0, 0, 0)
        if data != "random":
            q[:] = 0.0
            k[:] = 0.0
            if data == "zero":
                v[:] = 0.0
    else:
        extra = int(rng.integers(0, 5))
        width = 3 * hd + extra
        qkv = rng.standard_normal((B * S, width)).astype(np.float32)
        order = rng.permutation(3)
        start = int(rng.integers(0, extra + 1))
        cols = tuple(start + int(order[i]) * hd for i in range(3))
        if data != "random":
            qkv[:, cols[0] : cols[0] + hd] = 0.0
            qkv[:, cols[1] : cols[1] + hd] = 0.0
            if data == "zero":
                qkv[:, cols[2] : cols[2] + hd] = 0.0
        q = k = v = qkv
    out = np.full((B * S, hd), np.nan, np.float32)
    attention(q, k, v, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out)
    ref = expected(q, k, v, mask, B, S, H, D, scale, *cols)
    return out, ref, (q, k, v, cols)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    S=st.integers(1, 45),
    H=st.integers(1, 4),
    D=st.integers(1, 70),
    mask_kind=st.sampled_from(["none", "padded", "one_key", "real"]),
    layout=st.sampled_from(["separate", "fused"]),
    data=st.sampled_from(["random", "zero", "zero_qk"]),
)
@example(seed=0, B=1, S=1, H=1, D=1, mask_kind="none", layout="separate", data="random")
@example(seed=1, B=2, S=9, H=3, D=33, mask_kind="padded", layout="fused", data="random")
@example(seed=2, B=3, S=17, H=2, D=8, mask_kind="one_key", layout="fused", data="zero_qk")
def test_attention_random(seed, B, S, H, D, mask_kind, layout, data):
    # S and D not multiples of the 8 x 32 block; all-zero Q, K (uniform weights) and all-zero V
    rng = np.random.default_rng(seed)
    out, ref, _ = run_both(rng, B, S, H, D, make_mask(rng, mask_kind, B, S), layout, data)
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))
    if data == "zero":
        np.testing.assert_array_equal(out, 0.0)


def test_attention_with_one_visible_key_copies_its_value_row():
    """float32-min on every key but one: every query of that batch row gets exactly that key's V."""
    rng = np.random.default_rng(5)
    B, S, H, D = 3, 21, 2, 40
    mask = make_mask(rng, "one_key", B, S)
    out, ref, (q, k, v, cols) = run_both(rng, B, S, H, D, mask, "fused")
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))
    for b in range(B):
        key = int(np.flatnonzero(mask[b] == 0)[0])
        value = v[b * S + key, cols[2] : cols[2] + H * D]
        np.testing.assert_allclose(out[b * S : (b + 1) * S], np.broadcast_to(value, (S, H * D)), **tolerance("attention", np.float32, k=D))


def test_attention_ignores_padded_keys():
    """With right padding masked by float32-min, the result equals the reference run on the visible
    keys only (the padded keys' K and V may hold anything)."""
    rng = np.random.default_rng(6)
    B, S, H, D = 3, 19, 4, 16
    mask = make_mask(rng, "padded", B, S)
    out, ref, (q, k, v, cols) = run_both(rng, B, S, H, D, mask, "separate")
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))
    for b in range(B):
        n = int((mask[b] == 0).sum())
        rows = slice(b * S, (b + 1) * S)
        visible = reference.attention(
            q[None, rows], k[None, b * S : b * S + n], v[None, b * S : b * S + n], num_heads=H, scale=1.0 / np.sqrt(D)
        )
        np.testing.assert_allclose(out[rows], visible[0], **tolerance("attention", np.float32, k=D))


def test_attention_bert_shape_fully_masked_row():
    rng = np.random.default_rng(3)
    B, S, H, D = 2, 128, 12, 64
    qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
    mask = np.zeros((B, S), np.float32)
    mask[1, 100:] = F32_MIN
    ws = make_workspace(S, D)
    out = np.empty((B * S, H * D), np.float32)
    cols = (0, H * D, 2 * H * D)
    attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out, workspace=ws)
    ref = expected(qkv, qkv, qkv, mask, B, S, H, D, 1 / 8.0, *cols)
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))
    # every key masked: uniform attention (same as torch / onnxruntime with finfo.min)
    mask[:] = F32_MIN
    attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out, workspace=ws)
    ref = expected(qkv, qkv, qkv, mask, B, S, H, D, 1 / 8.0, *cols)
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))
