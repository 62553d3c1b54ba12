"""Block-sparse matmul kernel and the BSR format vs the NumPy reference (float64 Dense)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.graph.reference import dense as dense_ref
from sparseinfer.kernels import bsr as B
from sparseinfer.kernels.sparse_formats import pack_bsr
from tests.tolerances import tolerance

ACTS = {B.ACT_NONE: "none", B.ACT_GELU: "gelu", B.ACT_GELU_EXACT: "gelu", B.ACT_TANH: "tanh"}
# The shapes the layout pass may pick; each (block, register width) compiles its own specialisation.
BLOCKS = [(1, 4), (4, 1), (1, 8), (4, 4), (2, 2), (8, 1), (1, 16), (2, 1)]


def block_sparse_weight(rng, K, N, block, dens, inner_zero=0.0):
    """W with a random mask of whole r x c blocks (block density ``dens``); blocks at the edges
    are cut by K and N; ``inner_zero``: fraction of zeros inside kept blocks."""
    r, c = block
    keep = rng.random((-(-K // r), -(-N // c))) < dens
    mask = np.kron(keep, np.ones((r, c), bool))[:K, :N]
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    W[~mask] = 0.0
    W[rng.random((K, N)) < inner_zero] = 0.0
    return W


def unpack_bsr(indptr, indices, data, K, N):
    """Dense W from the BSR format (inverse of pack_bsr), for format tests."""
    _, r, c = data.shape
    nbc = -(-N // c)
    Wp = np.zeros((-(-K // r) * r, nbc * c), np.float32)
    npanel = (len(indptr) - 1) // nbc
    for b in range(npanel):
        for j in range(nbc):
            q = b * nbc + j
            for p in range(indptr[q], indptr[q + 1]):
                Wp[indices[p] : indices[p] + r, j * c : (j + 1) * c] += data[p]
    return Wp[:K, :N]


def check(seed, M, K, N, block, dens, use_bias, use_res, act, inner_zero=0.0, kb=None, workspace=None):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = block_sparse_weight(rng, K, N, block, dens, inner_zero)
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    out = np.full((M, N), np.nan, np.float32)  # every element must be written
    B.bsr_matmul(X, pack_bsr(W, block, kb), N, bias, res, out, act, workspace=workspace)
    ref = dense_ref(X, W, bias, res, activation=ACTS[act])
    np.testing.assert_allclose(out, ref, **tolerance("bsr", np.float32, K))


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from([1, 20, 77, 130]),
    K=st.integers(1, 200),
    N=st.integers(1, 300),
    block=st.sampled_from(BLOCKS),
    dens=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    inner_zero=st.sampled_from([0.0, 0.5]),
    act=st.sampled_from(list(ACTS)),
    kb=st.sampled_from([None, 8, 64]),
)
def test_bsr_random(seed, M, K, N, block, dens, inner_zero, act, kb):
    # K and N are mostly not multiples of the block (zero padding); M covers 1 row,
    # partial tiles and two row chunks.  bias and residual are always given here
    # (each optional-operand combination is one more compilation per block shape);
    # test_bsr_epilogue_variants covers None.
    check(seed, M, K, N, block, dens, True, True, act, inner_zero, kb)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_res", [False, True])
@pytest.mark.parametrize("act", list(ACTS))
def test_bsr_epilogue_variants(use_bias, use_res, act):
    check(7, 70, 45, 50, (1, 4), 0.4, use_bias, use_res, act)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 2, 17), (129, 9, 3)])
@pytest.mark.parametrize("dens", [0.0, 1.0])
def test_bsr_degenerate(block, M, K, N, dens):
    check(M + K + N, M, K, N, block, dens, True, True, B.ACT_GELU)


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (4, 4)])
@pytest.mark.parametrize("K,N", [(768, 768), (3072, 768)])
def test_bsr_bert_shapes(block, K, N):
    check(K + N, 128, K, N, block, 0.1, True, True, B.ACT_NONE)


def test_bsr_workspace_reuse():
    K, N, block = 70, 41, (4, 4)
    ws = B.make_workspace(300, K, N, block)
    ws[0][:] = np.nan
    ws[1][:] = np.nan
    for M in (300, 130, 5, 1):
        check(M, M, K, N, block, 0.3, True, False, B.ACT_NONE, workspace=ws)


@pytest.mark.parametrize(
    "c, m, parts, lanes",
    [
        (1, 0, 2, 128),  # no rows given: the widest
        (1, 128, 1, 128),
        (1, 128, 2, 64),  # one 128-row chunk for two threads: two of 64
        (1, 129, 2, 128),  # two chunks already
        (1, 256, 2, 128),
        (1, 100, 4, 64),  # never below 64 rows
        (2, 128, 2, 64),
        (4, 128, 2, 64),
        (4, 4096, 2, 64),
        (8, 128, 2, 32),  # blocks this wide have narrower tiles, unchanged
        (16, 1, 8, 16),
    ],
)
def test_chunk_rows(c, m, parts, lanes):
    assert B.chunk_rows(c, m, parts) == lanes


def test_bsr_unsupported_block():
    W = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"block \(3, 4\) is not supported"):
        B.bsr_matmul(np.ones((2, 8), np.float32), pack_bsr(W, (3, 4)), 8)
    with pytest.raises(ValueError, match="not supported"):
        B.make_workspace(4, 8, 8, (1, 32))


def test_bsr_operand_errors():
    W = np.ones((8, 8), np.float32)
    X = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="nblocks"):
        B.bsr_matmul(X, (np.zeros(9, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)), 8)
    with pytest.raises(ValueError, match="indptr"):
        B.bsr_matmul(X, pack_bsr(W, (1, 4)), 12)
    with pytest.raises(ValueError, match="workspace"):
        B.bsr_matmul(X, pack_bsr(W, (1, 4)), 8, workspace=B.make_workspace(2, 8, 8, (4, 1)))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(0, 40),
    N=st.integers(1, 40),
    r=st.integers(1, 5),
    c=st.integers(1, 5),
    dens=st.floats(0.0, 1.0),
    inner_zero=st.sampled_from([0.0, 0.7]),
    kb_blocks=st.sampled_from([None, 1, 3, 100]),
)
def test_pack_bsr_roundtrip(seed, K, N, r, c, dens, inner_zero, kb_blocks):
    # the format handles any block shape (the kernel supports a subset)
    rng = np.random.default_rng(seed)
    W = block_sparse_weight(rng, K, N, (r, c), dens, inner_zero)
    kb = None if kb_blocks is None else kb_blocks * r
    indptr, indices, data = pack_bsr(W, (r, c), kb)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and data.dtype == np.float32
    assert data.shape[1:] == (r, c) and len(indices) == len(data) == indptr[-1]
    assert np.all(indices % r == 0) and np.all(np.diff(indptr) >= 0)
    # a block is stored iff it holds a nonzero
    Wp = np.zeros((-(-K // r) * r, -(-N // c) * c), np.float32)
    Wp[:K, :N] = W
    nonzero_blocks = np.count_nonzero(np.abs(Wp).reshape(Wp.shape[0] // r, r, Wp.shape[1] // c, c).sum(axis=(1, 3)))
    assert len(indices) == nonzero_blocks
    np.testing.assert_array_equal(unpack_bsr(indptr, indices, data, K, N), W)


def test_pack_bsr_errors():
    W = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of the block height"):
        pack_bsr(W, (4, 1), kb=6)
    with pytest.raises(ValueError, match="positive"):
        pack_bsr(W, (0, 4))
    with pytest.raises(ValueError, match="pair"):
        pack_bsr(W, 4)
