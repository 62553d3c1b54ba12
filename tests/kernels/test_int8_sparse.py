"""Sparse int8 kernel against NumPy: exact integer accumulation (int64 reference) over shapes,
densities and block structures; the dequantized result against the dense int8 kernel on the same
quantized operands (equal bit for bit) and against the reference Dense; the 4 x 1 block format."""

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
from sparseinfer.kernels import int8_sparse as S
from sparseinfer.passes.quantize import block_density_4x1
from tests.kernels.test_int8 import ACTIVATION, acc_reference, portable_features, quantize
from tests.tolerances import INT8_ATOL, INT8_RTOL

# M crosses the 16-row relayout tasks, the 16/32/64/128-lane tiles and the 128-row chunks
ROWS = [1, 2, 15, 16, 17, 33, 64, 127, 128, 129, 200, 300]


def sparse_int8_weight(rng, K, N, density, structure, w_kind="random"):
    """int8 [K, N]: `structure` "4x1" keeps whole 4 x 1 blocks (k = 4g .. 4g+3 of one column) with
    probability `density`, "unstructured" single values; `w_kind` picks the kept values."""
    Wq = rng.integers(-128, 128, (K, N), dtype=np.int8)
    if w_kind == "min":
        Wq[:] = -128
    elif w_kind == "max":
        Wq[:] = 127
    elif w_kind == "alternating":  # +127 / -128 in each group of 4 k: the largest pair sums
        Wq[:] = np.where(np.arange(K)[:, None] % 2 == 0, 127, -128)
    if structure == "4x1":
        keep = np.repeat(rng.random((-(-K // 4), N)) < density, 4, axis=0)[:K]
    else:
        keep = rng.random((K, N)) < density
    Wq[~keep] = 0
    return Wq


def unpack(packed, K, N):
    """Dense int8 [K, N] from the 4 x 1 block format (inverse of pack_sparse_int8)."""
    indptr, indices, data = packed
    G = -(-K // 4)
    full = np.zeros((4 * max(G, 1), N), np.int8)
    npanel = (len(indptr) - 1) // N
    for b in range(npanel):
        for n in range(N):
            q = b * N + n
            for p in range(indptr[q], indptr[q + 1]):
                g = indices[p]
                assert not full[4 * g : 4 * g + 4, n].any(), "a block stored twice"
                full[4 * g : 4 * g + 4, n] = np.array([data[p]], np.int32).view(np.int8)
    return full[:K]


def int_case(seed, M, K, N, density, structure, x_kind, w_kind, zp_kind, kb=None, workspace=None):
    rng = np.random.default_rng(seed)
    xq = rng.integers(0, 256, (M, Q.padded_k(K)), dtype=np.uint8)
    if x_kind == "max":
        xq[:] = 255
    elif x_kind == "zero":
        xq[:] = 0
    Wq = sparse_int8_weight(rng, K, N, density, structure, w_kind)
    zp = {"random": rng.integers(0, 256, M), "zero": np.zeros(M), "max": np.full(M, 255)}[zp_kind].astype(np.uint8)
    if K % 4:
        xq[:, K:] = zp[:, None]  # as quantize_rows pads
    packed, colsum = S.pack_sparse_int8(Wq, kb)
    out = np.full((M, N), -7, np.int32)
    S.sparse_matmul_int8(xq, zp, packed, colsum, out, workspace=workspace)
    np.testing.assert_array_equal(out, acc_reference(xq, zp, Wq))


# --------------------------------------------------------------------------- exact accumulation


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from(ROWS),
    K=st.integers(0, 100),
    N=st.integers(1, 100),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    structure=st.sampled_from(["4x1", "unstructured"]),
    x_kind=st.sampled_from(["random", "max", "zero"]),
    w_kind=st.sampled_from(["random", "min", "max", "alternating"]),
    zp_kind=st.sampled_from(["random", "zero", "max"]),
    kb=st.sampled_from([None, 4, 8, 36, 10_000]),
)
@example(seed=0, M=1, K=1, N=1, density=1.0, structure="4x1", x_kind="max", w_kind="min", zp_kind="zero", kb=None)
@example(seed=1, M=17, K=7, N=33, density=1.0, structure="4x1", x_kind="max", w_kind="max", zp_kind="zero", kb=None)
@example(seed=2, M=129, K=70, N=65, density=1.0, structure="4x1", x_kind="zero", w_kind="min", zp_kind="max", kb=8)
@example(seed=3, M=300, K=67, N=45, density=0.0, structure="4x1", x_kind="random", w_kind="random", zp_kind="random", kb=None)
def test_sparse_matmul_int8_is_exact(seed, M, K, N, density, structure, x_kind, w_kind, zp_kind, kb):
    int_case(seed, M, K, N, density, structure, x_kind, w_kind, zp_kind, kb)


@pytest.mark.parametrize(("x_kind", "w_kind", "zp_kind"), [("max", "min", "zero"), ("zero", "min", "max"), ("max", "max", "zero")])
def test_sparse_matmul_int8_at_max_k_reaches_the_int32_limits_exactly(x_kind, w_kind, zp_kind):
    # 255 * 128 * MAX_K = 2147483520: one step below int32 overflow, in the accumulator (xq = 255)
    # or in the zero-point term (xq = 0, zp = 255)
    int_case(0, 17, Q.MAX_K, 19, 1.0, "4x1", x_kind, w_kind, zp_kind)


def test_workspace_reuse_never_leaks_stale_lanes():
    # one workspace for the largest call, filled with NaN, reused for smaller M (same lanes: 128)
    ws = S.make_workspace(300, 70)
    for a in ws.values():
        a.view(np.uint8)[:] = 0xFF
    for M in (300, 200, 129):
        int_case(M, M, 70, 40, 0.5, "unstructured", "random", "random", "random", workspace=ws)


# --------------------------------------------------------------------------- dequantized result


def float_case(seed, M, K, N, density, structure, use_bias, use_res, act, fused=False):
    """The float epilogue vs dense_int8 on the same quantized operands: the same bits."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (M, K)).astype(np.float32)
    if M > 1:
        X[rng.integers(M)] = 0.0  # an all-zero row: scale 0
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    W[sparse_int8_weight(rng, K, N, density, structure) == 0] = 0.0
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    xq, xs, xzp = quantize(X)
    dense = Q.dense_int8(xq, xs, xzp, *Q.pack_weight_int8(W), bias, res, act=act)
    packed, w_scale, colsum = S.pack_weight_sparse_int8(W)
    out = np.full((M, N), np.nan, np.float32)
    if fused:
        ws = S.make_workspace(M, K)
        S.quantized_sparse_dense(X, packed, w_scale, colsum, bias, res, out, act, workspace=ws)
        np.testing.assert_array_equal(ws["xq"], xq)
        np.testing.assert_array_equal(ws["x_scale"], xs)
        np.testing.assert_array_equal(ws["x_zp"], xzp)
    else:
        S.sparse_dense_int8(xq, xs, xzp, packed, w_scale, colsum, bias, res, out, act)
    np.testing.assert_array_equal(out, dense)
    return X, W, xq, xs, xzp, bias, res, out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from(ROWS),
    K=st.integers(0, 90),
    N=st.integers(1, 90),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    structure=st.sampled_from(["4x1", "unstructured"]),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from(sorted(ACTIVATION)),
    fused=st.booleans(),
)
@example(seed=0, M=1, K=1, N=1, density=1.0, structure="4x1", use_bias=True, use_res=True, act=D.ACT_GELU, fused=True)
@example(seed=1, M=129, K=33, N=65, density=0.3, structure="unstructured", use_bias=True, use_res=True, act=D.ACT_GELU, fused=False)
def test_sparse_dense_int8_equals_dense_int8(seed, M, K, N, density, structure, use_bias, use_res, act, fused):
    float_case(seed, M, K, N, density, structure, use_bias, use_res, act, fused)


@pytest.mark.parametrize(("K", "N"), [(768, 768), (768, 2304), (3072, 768)])
@pytest.mark.parametrize("structure", ["4x1", "unstructured"])
def test_bert_shapes_against_the_reference_on_dequantized_operands(K, N, structure):
    X, W, xq, xs, xzp, bias, res, out = float_case(K + N, 128, K, N, 0.1, structure, True, True, D.ACT_GELU, fused=True)
    Wq, ws = Q.quantize_weight(W)
    xd = (xq[:, :K].astype(np.float64) - xzp[:, None]) * xs.astype(np.float64)[:, None]
    wd = Wq.astype(np.float64) * ws.astype(np.float64)
    ref = reference.dense(xd, wd, bias, res, activation="gelu")
    bound = INT8_RTOL * (np.abs(xd @ wd) + np.abs(bias) + np.abs(res)) + INT8_ATOL
    assert (np.abs(out - ref) <= bound).all()


def test_out_may_be_the_residual():
    rng = np.random.default_rng(11)
    X = rng.uniform(-1, 1, (40, 45)).astype(np.float32)
    W = rng.uniform(-1, 1, (45, 70)).astype(np.float32) * (rng.random((45, 70)) < 0.3)
    res = rng.uniform(-1, 1, (40, 70)).astype(np.float32)
    packed, ws, colsum = S.pack_weight_sparse_int8(W)
    expect = S.quantized_sparse_dense(X, packed, ws, colsum, None, res.copy(), act=D.ACT_GELU)
    S.quantized_sparse_dense(X, packed, ws, colsum, None, res, res, act=D.ACT_GELU)
    np.testing.assert_array_equal(res, expect)


def test_empty_operands():
    """M = 0 and N = 0 give empty outputs; K = 0 gives act(bias) + residual."""
    rng = np.random.default_rng(5)
    bias = rng.uniform(-1, 1, 40).astype(np.float32)
    res = rng.uniform(-1, 1, (5, 40)).astype(np.float32)
    W = np.zeros((0, 40), np.float32)
    out = S.quantized_sparse_dense(np.zeros((5, 0), np.float32), *S.pack_weight_sparse_int8(W), bias, res, act=D.ACT_GELU)
    np.testing.assert_allclose(out, reference.dense(np.zeros((5, 0)), W, bias, res, activation="gelu"), rtol=1e-6, atol=INT8_ATOL)
    W = np.ones((7, 40), np.float32)
    assert S.quantized_sparse_dense(np.zeros((0, 7), np.float32), *S.pack_weight_sparse_int8(W)).shape == (0, 40)
    assert S.quantized_sparse_dense(np.ones((3, 7), np.float32), *S.pack_weight_sparse_int8(np.ones((7, 0), np.float32))).shape == (3, 0)


def test_rejects_mismatched_operands():
    packed, ws, colsum = S.pack_weight_sparse_int8(np.ones((10, 40), np.float32))
    xq, xs, xzp = quantize(np.ones((3, 10), np.float32))
    with pytest.raises(ValueError, match="block at row"):
        S.sparse_dense_int8(xq[:, :8].copy(), xs, xzp, packed, ws, colsum)
    with pytest.raises(ValueError, match="uint8"):
        S.sparse_dense_int8(xq.astype(np.int8), xs, xzp, packed, ws, colsum)
    with pytest.raises(ValueError, match="indptr"):
        S.sparse_dense_int8(xq, xs, xzp, packed, ws[:30], colsum[:30])
    with pytest.raises(ValueError, match="activation"):
        S.sparse_dense_int8(xq, xs, xzp, packed, ws, colsum, act=99)
    with pytest.raises(ValueError, match="too small"):
        S.sparse_dense_int8(xq, xs, xzp, packed, ws, colsum, workspace=S.make_workspace(3, 4))
    with pytest.raises(ValueError, match="too large"):
        S.pack_sparse_int8(np.zeros((Q.MAX_K + 1, 1), np.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        S.pack_sparse_int8(np.zeros((8, 1), np.int8), kb=6)


# --------------------------------------------------------------------------- chaining


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from(ROWS),
    K=st.integers(1, 70),
    H=st.integers(1, 90),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from(sorted(ACTIVATION)),
)
@example(seed=3, M=129, K=33, H=66, density=0.3, use_bias=True, use_res=True, act=D.ACT_GELU)
@example(seed=4, M=200, K=8, H=3, density=1.0, use_bias=False, use_res=False, act=D.ACT_RELU)
def test_chained_pair_equals_two_calls(seed, M, K, H, density, use_bias, use_res, act):
    """X -> act(X @ W1 + b1) -> (. @ W2 + b2) + residual through the chain (the intermediate
    transposed and quantized from there) gives the bits of two separate calls: every row's range,
    scale, zero point and quantized bytes are the same. H not a multiple of 4 pads the last group;
    ReLU makes rows of zeros (scale 0)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (M, K)).astype(np.float32)
    X[rng.integers(M)] = 0.0
    W1 = rng.uniform(-1, 1, (K, H)).astype(np.float32) * (sparse_int8_weight(rng, K, H, density, "4x1") != 0)
    W2 = rng.uniform(-1, 1, (H, K)).astype(np.float32) * (sparse_int8_weight(rng, H, K, density, "4x1") != 0)
    b1 = rng.uniform(-1, 1, H).astype(np.float32) if use_bias else None
    b2 = rng.uniform(-1, 1, K).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, K)).astype(np.float32) if use_res else None
    p1, p2 = S.pack_weight_sparse_int8(W1), S.pack_weight_sparse_int8(W2)
    y = S.quantized_sparse_dense(X, *p1, b1, act=act)
    expect = S.quantized_sparse_dense(y, *p2, b2, res)
    out = S.quantized_sparse_chain(X, (*p1, b1, act), (*p2, b2, D.ACT_NONE), res)
    np.testing.assert_array_equal(out, expect)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from(ROWS),
    K=st.integers(1, 70),
    N=st.integers(1, 90),
    density=st.floats(0.0, 1.0),
    act=st.sampled_from(sorted(ACTIVATION)),
)
def test_chain_write_without_ranges(seed, M, K, N, density, act):
    """CHAIN_WRITE with NO_RANGE (the int8 attention's input) writes the result transposed, the
    same bits as the call that returns it row-major, and keeps no row ranges."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32) * (sparse_int8_weight(rng, K, N, density, "4x1") != 0)
    bias = rng.uniform(-1, 1, N).astype(np.float32)
    packed, w_scale, colsum = S.pack_weight_sparse_int8(W)
    expect = S.quantized_sparse_dense(X, packed, w_scale, colsum, bias, act=act)
    ws = S.make_workspace(M, K)
    chain = np.full(S.chain_workspace_shapes(M, N)["chain"], np.nan, np.float32)
    S.sparse_int8_kernel(M)(
        X, *packed, w_scale, colsum, bias, None, np.empty((0, N), np.float32), act,
        ws["xq"], ws["x_scale"], ws["x_zp"], ws["xt"], ws["xs"], ws["ot"], chain, S.NO_RANGE, S.CHAIN_WRITE,
    )  # fmt: skip
    rows = chain.transpose(0, 2, 1).reshape(-1, N)[:M]  # chain[t // L, n, t % L] = Y[t, n]
    np.testing.assert_array_equal(rows, expect)


def test_chain_rejects_bad_use():
    M, K, H = 20, 12, 16
    X = np.ones((M, K), np.float32)
    p1, s1, c1 = S.pack_weight_sparse_int8(np.ones((K, H), np.float32))
    p2, s2, c2 = S.pack_weight_sparse_int8(np.ones((H, K), np.float32))
    ws = S.make_workspace(M, H)
    kernel = S.sparse_int8_kernel(M)
    link = {k: np.zeros(v, np.float32) for k, v in S.chain_workspace_shapes(M, H).items()}
    args = (np.zeros((M, K), np.uint8), ws["x_scale"], ws["x_zp"], ws["xt"], ws["xs"], ws["ot"])
    with pytest.raises(ValueError, match="no residual"):
        kernel(
            X,
            *p1,
            s1,
            c1,
            None,
            np.ones((M, H), np.float32),
            np.empty((0, H), np.float32),
            0,
            *args,
            link["chain"],
            link["crange"],
            S.CHAIN_WRITE,
        )
    with pytest.raises(ValueError, match="X only when it writes"):
        kernel(X, *p2, s2, c2, None, None, np.empty((M, K), np.float32), 0, *args, link["chain"], link["crange"], S.CHAIN_READ)
    with pytest.raises(ValueError, match="chain workspace does not match"):
        kernel(
            X,
            *p1,
            s1,
            c1,
            None,
            None,
            np.empty((0, H), np.float32),
            0,
            *args,
            link["chain"][:, :, :8].copy(),
            link["crange"],
            S.CHAIN_WRITE,
        )


# --------------------------------------------------------------------------- format


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(0, 40),
    N=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    structure=st.sampled_from(["4x1", "unstructured"]),
    kb=st.sampled_from([None, 4, 8, 12, 1000]),
)
def test_pack_sparse_int8_roundtrip(seed, K, N, density, structure, kb):
    check_format(sparse_int8_weight(np.random.default_rng(seed), K, N, density, structure), kb)


def check_format(Wq, kb):
    K, N = Wq.shape
    (indptr, indices, data), colsum = S.pack_sparse_int8(Wq, kb)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and data.dtype == np.int32
    G = -(-K // 4)
    nblocks = round(block_density_4x1(Wq) * G * N) if K else 0
    if kb is None:  # the packer's choice: K panels only where the weight is dense enough to need them
        kb = S.KB_INT8 if nblocks > S.PANEL_MIN_BLOCK_DENSITY * G * N else 4 * G
    kbg = max(1, G) if kb >= 4 * G else kb // 4
    npanel = max(1, -(-G // kbg))
    assert indptr.shape == (npanel * N + 1,) and indptr[0] == 0 and np.all(np.diff(indptr) >= 0)
    assert indptr[-1] == len(indices) == len(data) == nblocks
    for q in range(npanel * N):  # block rows inside the segment's panel, ascending, nonzero
        seg = indices[indptr[q] : indptr[q + 1]]
        b = q // N
        assert np.all((seg >= b * kbg) & (seg < (b + 1) * kbg)) and np.all(np.diff(seg) > 0)
    assert np.all(data != 0)
    np.testing.assert_array_equal(unpack((indptr, indices, data), K, N), Wq)
    np.testing.assert_array_equal(colsum, Wq.astype(np.int64).sum(axis=0))
    return npanel


@pytest.mark.parametrize(("density", "panels"), [(0.1, 1), (0.3, 3)])
def test_pack_sparse_int8_chooses_k_panels_by_density(density, panels):
    # K = 600: 150 block rows, 3 panels of KB_INT8 = 256 rows when more than 15% of the blocks are nonzero
    Wq = sparse_int8_weight(np.random.default_rng(1), 600, 50, density, "4x1")
    assert check_format(Wq, None) == panels


def test_pack_weight_sparse_int8_quantizes_as_the_dense_kernel():
    rng = np.random.default_rng(2)
    W = rng.uniform(-1, 1, (37, 20)).astype(np.float32) * (rng.random((37, 20)) < 0.4)
    packed, scale, colsum = S.pack_weight_sparse_int8(W)
    Wq, scale_ref = Q.quantize_weight(W)
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(unpack(packed, 37, 20), Wq)
    np.testing.assert_array_equal(colsum, Wq.sum(axis=0))


# --------------------------------------------------------------------------- code generation

PROBE = r"""
import json, collections
import numpy as np
from sparseinfer.kernels import int8 as Q, int8_sparse as S
rng = np.random.default_rng(0)
ok = True
for M, K, N, d in ((1, 1, 1, 1.0), (17, 7, 33, 0.5), (129, 70, 65, 0.3), (300, 131, 40, 0.1)):
    xq = rng.integers(0, 256, (M, Q.padded_k(K)), dtype=np.uint8)
    zp = rng.integers(0, 256, M).astype(np.uint8)
    Wq = rng.integers(-128, 128, (K, N), dtype=np.int8) * (rng.random((K, N)) < d)
    packed, colsum = S.pack_sparse_int8(Wq.astype(np.int8))
    ref = (xq[:, :K].astype(np.int64) - zp[:, None]) @ Wq.astype(np.int64)
    ok &= bool(np.array_equal(S.sparse_matmul_int8(xq, zp, packed, colsum), ref))
asm = "\n".join(S.sparse_int8_kernel(300).inspect_asm().values())
ops = collections.Counter(line.split()[0] for line in asm.splitlines() if line.startswith("\t"))
print(json.dumps({"ok": ok, "instruction": S.DOT_INSTRUCTION, "ops": ops}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("drop", [None, "vnni", "avx512"])
def test_vnni_on_the_host_and_the_portable_fallback_are_exact(tmp_path, drop):
    """The host build uses vpdpbusd where it exists; without AVX512-VNNI (or without any AVX-512)
    the pmaddwd form is exact."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    if drop:
        env["NUMBA_CPU_FEATURES"] = portable_features(drop)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ok"]
    if drop or not Q.HAS_VNNI:
        assert got["instruction"] == "vpmaddwd" and got["ops"].get("vpmaddwd", 0) > 0 and "vpdpbusd" not in got["ops"]
    else:
        assert got["ops"].get("vpdpbusd", 0) >= 8 and "vpdpbusds" not in got["ops"]
