"""Fused multi-head attention kernel against the Attention op of the NumPy reference."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels.attention import (
    attention,
    attention_fm,
    attention_fm_packed,
    attention_packed,
    exp_nonpositive,
    fm_supported,
    fm_workspace_shapes,
    make_fm_workspace,
    make_workspace,
)
from sparseinfer.kernels.sparse_formats import aligned_empty
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


@pytest.mark.parametrize(
    "B,S,H,D",
    [
        (1, 128, 12, 64),  # BERT-base, one sequence
        (2, 64, 2, 32),  # S and D multiples of the 32-wide tile
        (1, 16, 1, 16),  # one 16 x 16 transpose block, a half-masked context tile
        (2, 48, 3, 80),  # D = 80: a 16-column last context tile
        (1, 130, 2, 64),  # S past a multiple of 32: a 2-row last block, scalar K^T edge
        (1, 200, 1, 48),
        (3, 8, 2, 64),  # one query block per head
        (1, 5, 2, 96),  # S < 8: every block partial, keys padded from 5 to 32
    ],
)
@pytest.mark.parametrize("mask_kind", ["none", "padded", "one_key", "real"])
def test_attention_vector_paths_with_garbage_workspace(B, S, H, D, mask_kind):
    """Shapes on and off the 16 / 32 / 8 blocking of the kernel, with the workspace full of NaN
    beforehand: nothing the kernel did not write in this call may reach the output."""
    rng = np.random.default_rng(B * 1000 + S * 10 + D)
    hd = H * D
    qkv = rng.standard_normal((B * S, 3 * hd)).astype(np.float32)
    mask = make_mask(rng, mask_kind, B, S)
    ws = make_workspace(S, D)
    for w in ws:
        w[...] = np.nan
    out = np.full((B * S, hd), np.nan, np.float32)
    cols = (0, hd, 2 * hd)
    attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out, workspace=ws)
    ref = expected(qkv, qkv, qkv, mask, B, S, H, D, 1.0 / np.sqrt(D), *cols)
    np.testing.assert_allclose(out, ref, **tolerance("attention", np.float32, k=D))


def test_attention_result_does_not_depend_on_thread_count():
    """Each (batch, head) task is computed the same way whichever slot runs it: bitwise equal."""
    rng = np.random.default_rng(11)
    B, S, H, D = 2, 40, 3, 64
    qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
    mask = make_mask(rng, "padded", B, S)
    kt, vp, pw = make_workspace(S, D, 2)
    outs = []
    for nth in (1, 2):
        out = np.empty((B * S, H * D), np.float32)
        attention_packed(qkv, qkv, qkv, 0, H * D, 2 * H * D, mask, B, S, H, D, np.float32(0.125), out, kt, vp, pw, nth)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_attention_rejects_wrong_out_and_workspace():
    rng = np.random.default_rng(12)
    B, S, H, D = 1, 8, 2, 16
    qkv = rng.standard_normal((B * S, 3 * H * D)).astype(np.float32)
    args = (qkv, qkv, qkv, None, B, S, H, D)
    kw = {"q_col": 0, "k_col": H * D, "v_col": 2 * H * D}
    with pytest.raises(ValueError):
        attention(*args, out=np.empty((B * S, H * D + 1), np.float32), **kw)
    with pytest.raises(ValueError):
        attention(*args, workspace=make_workspace(S + 1, D), **kw)


@pytest.mark.parametrize("portable", [False, True])
def test_vector_exp_matches_float64_exp(portable):
    """The kernel's 16-lane exp (for softmax arguments x <= 0), with ``vscalefps`` and with the
    integer 2^n of CPUs without AVX-512: ~2 ulp like ``exp_f32``, exactly 0 below -87.3365
    (float32-min and -inf included), 1 at 0, NaN propagates."""
    rng = np.random.default_rng(13)
    x = np.concatenate(
        [
            -rng.uniform(0, 87.3, 4096),
            -rng.uniform(0, 1e-3, 1024),
            [0.0, -0.0, -1e-30, -87.33, -87.336, -87.34, -88.0, -100.0, -1e30, F32_MIN, -np.inf, np.nan, -0.5, -1.0, -2.0, -10.0],
        ]
    ).astype(np.float32)
    out = np.empty_like(x)
    exp_nonpositive(x, out, portable)
    ref = np.exp(x.astype(np.float64))
    normal = x >= np.float32(-87.3365478515625)
    np.testing.assert_allclose(out[normal], ref[normal], **tolerance("exp", np.float32))
    np.testing.assert_array_equal(out[~normal & ~np.isnan(x)], 0.0)
    assert np.isnan(out[np.isnan(x)]).all()
    assert out[x == 0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("rows", [[0], [3, 0], [1, 1, 2], list(range(9))])
@pytest.mark.parametrize("mask_kind", ["none", "padded", "real"])
def test_fewer_queries_than_keys(rows, mask_kind):
    """Queries for some rows of each sequence (a classifier's last layer computes the rows its
    pooler reads): those rows of the full attention."""
    rng = np.random.default_rng(len(rows))
    B, S, H, D = 2, 11, 3, 16
    hd = H * D
    qkv = rng.standard_normal((B * S, 3 * hd)).astype(np.float32)
    mask = make_mask(rng, mask_kind, B, S)
    full = expected(qkv, qkv, qkv, mask, B, S, H, D, 0.25, 0, hd, 2 * hd)
    q = np.ascontiguousarray(qkv.reshape(B, S, -1)[:, rows].reshape(B * len(rows), -1))
    out = attention(q, qkv, qkv, mask, B, S, H, D, 0.25, 0, hd, 2 * hd)
    want = full.reshape(B, S, hd)[:, rows].reshape(B * len(rows), hd)
    np.testing.assert_allclose(out, want, **tolerance("attention", np.float32, k=D))


# --------------------------------------------------------------------------
# feature-major input (attention_fm): src[t // L, n, t % L] = x[t, n]
# --------------------------------------------------------------------------


def to_fm(x, L, extra_rows=0, extra_chunks=0):
    """The feature-major layout a sparse Dense writes, NaN in the lanes past the last token, in
    ``extra_rows`` features past those of ``x`` and in ``extra_chunks`` chunks past the last."""
    M, N = x.shape
    nch = -(-M // L) + extra_chunks
    fm = aligned_empty((nch, N + extra_rows, L), np.float32)
    fm[...] = np.nan
    t = np.arange(M)
    fm[t // L, :N, t % L] = x
    return fm


def from_fm(fm, M, N):
    """Rows ``0..M``, features ``0..N`` of a feature-major array, as a row-major [M, N] array."""
    t = np.arange(M)
    return fm[t // fm.shape[2], :N, t % fm.shape[2]]


def run_fm(qkv, mask, B, S, H, D, L, cols, fm_out, extra_rows=0, extra_out_rows=0, extra_chunks=0):
    """attention_fm on ``qkv`` in the feature-major layout (garbage workspace, NaN-filled output);
    the result as a row-major [B*S, H*D] array, and the raw output."""
    hd = H * D
    src = to_fm(qkv, L, extra_rows, extra_chunks)
    ws = make_fm_workspace(S, D)
    for w in ws:
        w[...] = np.nan
    if fm_out:
        out = np.full((-(-B * S // L) + extra_chunks, hd + extra_out_rows, L), np.nan, np.float32)
    else:
        out = np.full((B * S, hd), np.nan, np.float32)
    got = attention_fm(src, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out, fm_out=fm_out, workspace=ws)
    assert got is out
    return (from_fm(out, B * S, hd) if fm_out else out), out


def packed_rows(qkv, mask, B, S, H, D, cols):
    out = np.empty((B * S, H * D), np.float32)
    attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=cols[0], k_col=cols[1], v_col=cols[2], out=out)
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    S=st.sampled_from([32, 64, 96, 128]),
    H=st.integers(1, 3),
    D=st.sampled_from([16, 32, 48, 64, 80]),
    L=st.sampled_from([32, 64, 128]),
    mask_kind=st.sampled_from(["none", "padded", "one_key", "real"]),
    fm_out=st.booleans(),
    extra=st.integers(0, 33),
)
@example(seed=0, B=1, S=128, H=2, D=64, L=64, mask_kind="padded", fm_out=True, extra=0)
@example(seed=1, B=3, S=32, H=2, D=16, L=128, mask_kind="one_key", fm_out=False, extra=5)
@example(seed=2, B=2, S=96, H=1, D=80, L=32, mask_kind="real", fm_out=True, extra=17)
def test_attention_fm_equals_packed_bitwise(seed, B, S, H, D, L, mask_kind, fm_out, extra):
    """Feature-major Q, K, V (at shuffled feature offsets, NaN in the lanes past B*S, in extra
    features and in an extra chunk): bit for bit the result of attention_packed on the row-major
    equivalent, in both output layouts; the padding rows of a feature-major output are zeros."""
    rng = np.random.default_rng(seed)
    hd = H * D
    qkv = rng.standard_normal((B * S, 3 * hd + extra)).astype(np.float32)
    start = int(rng.integers(0, extra + 1))
    order = rng.permutation(3)
    cols = tuple(start + int(order[i]) * hd for i in range(3))
    mask = make_mask(rng, mask_kind, B, S)
    got, raw = run_fm(qkv, mask, B, S, H, D, L, cols, fm_out, extra_rows=extra % 7, extra_out_rows=extra, extra_chunks=seed % 2)
    np.testing.assert_array_equal(got, packed_rows(qkv, mask, B, S, H, D, cols))
    np.testing.assert_allclose(
        got, expected(qkv, qkv, qkv, mask, B, S, H, D, 1.0 / np.sqrt(D), *cols), **tolerance("attention", np.float32, k=D)
    )
    if fm_out:
        np.testing.assert_array_equal(raw[:, hd:], 0.0)


@pytest.mark.parametrize("fm_out", [False, True])
def test_attention_fm_bert_shape_fully_masked_row(fm_out):
    """BERT-base (L = 64): a padded batch row and a batch row whose every key has the float32
    minimum (uniform weights), equal to attention_packed bit for bit."""
    rng = np.random.default_rng(21)
    B, S, H, D, L = 3, 128, 12, 64, 64
    hd = H * D
    qkv = rng.standard_normal((B * S, 3 * hd)).astype(np.float32)
    mask = np.zeros((B, S), np.float32)
    mask[0, 100:] = F32_MIN
    mask[1] = F32_MIN
    cols = (0, hd, 2 * hd)
    got, raw = run_fm(qkv, mask, B, S, H, D, L, cols, fm_out, extra_out_rows=64 if fm_out else 0)
    want = packed_rows(qkv, mask, B, S, H, D, cols)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, expected(qkv, qkv, qkv, mask, B, S, H, D, 0.125, *cols), **tolerance("attention", np.float32, k=D))
    if fm_out:
        assert raw.shape == (6, hd + 64, L)
        np.testing.assert_array_equal(raw[:, hd:], 0.0)


def test_attention_fm_output_lanes_past_the_tokens_untouched():
    """B*S = 96 tokens in chunks of 64 lanes: lanes 32..64 of the last chunk's context rows keep
    what they held; its padding rows are zero in every lane."""
    rng = np.random.default_rng(22)
    B, S, H, D, L = 1, 96, 2, 32, 64
    hd = H * D
    qkv = rng.standard_normal((B * S, 3 * hd)).astype(np.float32)
    got, raw = run_fm(qkv, None, B, S, H, D, L, (0, hd, 2 * hd), True, extra_out_rows=16)
    np.testing.assert_array_equal(got, packed_rows(qkv, None, B, S, H, D, (0, hd, 2 * hd)))
    assert np.isnan(raw[1, :hd, 32:]).all()
    np.testing.assert_array_equal(raw[:, hd:], 0.0)


def test_attention_fm_result_does_not_depend_on_thread_count():
    rng = np.random.default_rng(23)
    B, S, H, D, L = 2, 64, 3, 48, 32
    hd = H * D
    src = to_fm(rng.standard_normal((B * S, 3 * hd)).astype(np.float32), L)
    mask = make_mask(rng, "padded", B, S)
    vp, pw = make_fm_workspace(S, D, 2)
    outs = []
    for nth in (1, 2):
        rows = np.empty((B * S, hd), np.float32)
        fm = np.empty((B * S // L, hd + 16, L), np.float32)
        none_fm = np.empty((0, 0, 0), np.float32)
        none_rows = np.empty((0, hd), np.float32)
        attention_fm_packed(src, 0, hd, 2 * hd, mask, B, S, H, D, np.float32(0.25), rows, none_fm, vp, pw, nth)
        attention_fm_packed(src, 0, hd, 2 * hd, mask, B, S, H, D, np.float32(0.25), none_rows, fm, vp, pw, nth)
        outs.append((rows, fm))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(from_fm(outs[0][1], B * S, hd), outs[0][0])


def test_fm_supported_and_workspace_shapes():
    assert fm_supported(128, 64, 64) and fm_supported(32, 16, 32) and fm_supported(384, 80, 128)
    for S, D, L in [(0, 64, 64), (48, 64, 64), (130, 64, 64), (128, 0, 64), (128, 72, 64), (128, 64, 16), (128, 64, 48)]:
        assert not fm_supported(S, D, L)
    assert fm_workspace_shapes(128, 64, 2) == ((2, 144, 64), (2, 10, 128))
    assert fm_workspace_shapes(64, 16, 1) == ((1, 80, 32), (1, 10, 64))


def test_attention_fm_rejects_bad_input():
    rng = np.random.default_rng(24)
    B, S, H, D, L = 2, 32, 2, 16, 32
    hd = H * D
    src = to_fm(rng.standard_normal((B * S, 3 * hd)).astype(np.float32), L)
    args = (None, B, S, H, D)
    kw = {"q_col": 0, "k_col": hd, "v_col": 2 * hd}
    attention_fm(src, *args, **kw)
    attention_fm(src, *args, fm_out=True, **kw)
    bad = [
        ((src.astype(np.float64), *args), kw),  # dtype
        ((src[:, :, :16], *args), kw),  # not C-contiguous
        ((src.reshape(2, -1), *args), kw),  # not 3-D
        ((src[:1], *args), kw),  # 32 tokens for B*S = 64
        ((src, None, B, 48, H, D), kw),  # S not a multiple of 32
        ((src, None, B, S, H, 8), kw),  # D not a multiple of 16
        ((to_fm(np.zeros((B * S, 3 * hd), np.float32), 16), *args), kw),  # L = 16
        ((src, *args), {**kw, "v_col": 2 * hd + 1}),  # past the features
        ((src, *args), {**kw, "q_col": -1}),
        ((src, np.zeros((B, S + 1), np.float32), B, S, H, D), kw),  # mask shape
        ((src, *args), {**kw, "out": np.empty((B * S, hd + 1), np.float32)}),
        ((src, *args), {**kw, "out": np.empty((B * S, hd), np.float64)}),
        ((src, *args), {**kw, "fm_out": True, "out": np.empty((B * S // L, hd - 1, L), np.float32)}),
        ((src, *args), {**kw, "fm_out": True, "out": np.empty((1, hd, L), np.float32)}),
        ((src, *args), {**kw, "fm_out": True, "out": np.empty((B * S // 64, hd, 64), np.float32)}),
        ((src, *args), {**kw, "fm_out": True, "out": np.empty((B * S, hd), np.float32)}),
        ((src, *args), {**kw, "workspace": make_fm_workspace(S + 32, D)}),
        ((src, *args), {**kw, "workspace": make_workspace(S, D)[1:]}),
    ]
    for a, k in bad:
        with pytest.raises(ValueError):
            attention_fm(*a, **k)
