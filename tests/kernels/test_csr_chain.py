"""Chained sparse kernels (``xnext`` / ``xready`` / ``xres`` of csr.chain_kernel) vs the NumPy reference.

A producer writes ``act(X @ W + bias)`` transposed into the next kernel's workspace, a consumer
reads its input from there instead of transposing X; chains of two and three kernels, CSR and
block-sparse, with the shapes and densities of the plain kernel tests."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.graph.reference import dense as dense_ref
from sparseinfer.kernels import bsr as B
from sparseinfer.kernels import csr as C
from sparseinfer.kernels.sparse_formats import aligned_empty, pack_bsr, pack_csr
from tests.kernels.test_bsr import block_sparse_weight
from tests.tolerances import tolerance

ACTS = {C.ACT_NONE: "none", C.ACT_GELU: "gelu", C.ACT_GELU_EXACT: "gelu", C.ACT_TANH: "tanh"}
# blocks whose kernels share a row-chunk width (B.chunk_rows), so one transposed layout serves both;
# the shapes test_csr / test_bsr compile anyway
CHUNK_GROUPS = [[(1, 1), (4, 1), (2, 2), (8, 1), (2, 1)], [(1, 4), (4, 4)], [(1, 8)], [(1, 16)]]


def step(block, K, M):
    """(kernel, pack, workspace shapes, padded K) of one link of a chain."""
    r, c = block
    lanes = B.chunk_rows(c)
    kp = -(-K // r) * r
    pack = pack_csr if block == (1, 1) else (lambda W: pack_bsr(W, block))
    return C.chain_kernel(r, c, C.lanes_for(M, lanes)), pack, C.workspace_shapes(M, max(r, kp), lanes), lanes


def to_feature_major(a, lanes, rows):
    """``a [M, N]`` as ``[ceil(M / lanes), rows >= N, lanes]``, row ``t`` at ``[t // lanes, :, t % lanes]``;
    NaN in the lanes past M and the rows past N (a kernel must not read them into a result)."""
    M, N = a.shape
    nch = -(-M // lanes)
    fm = aligned_empty((nch, rows, lanes))
    fm[:] = np.nan
    full = np.full((nch * lanes, N), np.nan, np.float32)
    full[:M] = a
    fm[:, :N, :] = full.reshape(nch, lanes, N).transpose(0, 2, 1)
    return fm


def run_chain(seed, M, dims, blocks, dens, acts, use_bias, use_res, parts=None):
    """X [M, dims[0]] through len(blocks) chained sparse Dense; checks every link against the reference
    applied to the link's actual input (the previous kernel's result read back from its workspace).
    With ``parts``, the kernels split their work into that many parts and read packs in the
    traversal order made for them (:func:`csr.traversal_order`)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (M, dims[0])).astype(np.float32)
    x, xt, x_rows = X, None, np.empty((M, 0), np.float32)
    nlinks = len(blocks)
    for i, block in enumerate(blocks):
        K, N = dims[i], dims[i + 1]
        kernel, pack, (sx, so), lanes = step(block, K, M)
        W = block_sparse_weight(rng, K, N, block, dens[i])
        packed, order = pack(W), C.NO_ORDER
        if parts is not None:
            so = (parts,) + so[1:]
            *packed, order = C.traversal_order(packed, N, block[1], M, lanes, parts)
        bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
        last = i == nlinks - 1
        res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
        ot = aligned_empty(so)
        ot[:] = np.nan
        ref = dense_ref(x, W, bias, res, activation=ACTS[acts[i]])
        tol = tolerance("bsr", np.float32, K)
        if xt is None:  # the first link transposes X itself
            xt = aligned_empty(sx)
            xt[:] = np.nan
        if last:
            out = np.full((M, N), np.nan, np.float32)
            kernel(X if i == 0 else x_rows, *packed, bias, res, out, acts[i], xt, ot, C.NO_NEXT, i > 0, order)
            np.testing.assert_allclose(out, ref, **tol)
        else:
            xnext = C.chain_workspace(M, N, lanes)
            xnext[:] = np.nan  # stale values must never be read
            nch = -(-M // lanes)
            xres = None if res is None else to_feature_major(res, lanes, xnext.shape[1])  # the residual in xnext's layout
            kernel(X if i == 0 else x_rows, *packed, bias, None, np.empty((0, N), np.float32), acts[i], xt, ot, xnext, i > 0, order, xres)
            y = xnext[:nch, :N].transpose(0, 2, 1).reshape(nch * lanes, N)[:M]  # back to row-major
            np.testing.assert_allclose(y, ref, **tol)
            assert not np.any(xnext[:nch, N:, : C.lanes_for(M, lanes)])  # the next kernel's K padding
            x, xt = y, xnext


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from([1, 20, 77, 130]),
    dims=st.lists(st.integers(1, 150), min_size=4, max_size=4),
    group=st.sampled_from(range(len(CHUNK_GROUPS))),
    picks=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    links=st.sampled_from([2, 3]),
    dens=st.lists(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)), min_size=3, max_size=3),
    acts=st.lists(st.sampled_from(list(ACTS)), min_size=3, max_size=3),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    parts=st.sampled_from([None, 1, 2, 3]),
)
def test_chain_random(seed, M, dims, group, picks, links, dens, acts, use_bias, use_res, parts):
    # M: one row, partial tiles, two row chunks; dims mostly not multiples of 16 or of the block;
    # with three links the middle kernel reads and writes a chained workspace
    blocks = [CHUNK_GROUPS[group][p % len(CHUNK_GROUPS[group])] for p in picks[:links]]
    run_chain(seed, M, dims[: links + 1], blocks, dens, acts, use_bias, use_res, parts)


@pytest.mark.parametrize("parts", [None, 2])
@pytest.mark.parametrize("blocks", [[(1, 1), (1, 1)], [(1, 4), (4, 4)], [(4, 1), (2, 2)]])
def test_chain_bert_ff(blocks, parts):
    # BERT's feed-forward pair: 768 -> 3072 (bias, GELU), 3072 -> 768 (bias, residual)
    run_chain(3, 128, [768, 3072, 768], blocks, [0.1, 0.1], [C.ACT_GELU, C.ACT_NONE], True, True, parts)


def test_chain_workspace_checked():
    kernel, pack, (sx, so), lanes = step((1, 1), 8, 20)
    W = np.ones((8, 5), np.float32)
    small = C.chain_workspace(20, 4, lanes)[:, :4]  # fewer rows than N
    with pytest.raises(ValueError, match="xnext"):
        kernel(np.ones((20, 8), np.float32), *pack(W), None, None, np.empty((0, 5), np.float32), C.ACT_NONE,
               aligned_empty(sx), aligned_empty(so), np.ascontiguousarray(small), False, C.NO_ORDER)  # fmt: skip


def test_chain_refuses_a_residual_in_the_wrong_layout():
    kernel, pack, (sx, so), lanes = step((1, 1), 8, 20)
    W = np.ones((8, 5), np.float32)
    x, nowhere = np.ones((20, 8), np.float32), np.empty((0, 5), np.float32)
    xres = to_feature_major(np.ones((20, 5), np.float32), lanes, 8)
    with pytest.raises(ValueError, match="xres"):  # without xnext
        kernel(x, *pack(W), None, None, np.empty((20, 5), np.float32), C.ACT_NONE, aligned_empty(sx), aligned_empty(so), C.NO_NEXT, False,
               C.NO_ORDER, xres)  # fmt: skip
    with pytest.raises(ValueError, match="xres"):  # fewer rows than N
        kernel(x, *pack(W), None, None, nowhere, C.ACT_NONE, aligned_empty(sx), aligned_empty(so), C.chain_workspace(20, 5, lanes), False,
               C.NO_ORDER, np.ascontiguousarray(xres[:, :4]))  # fmt: skip


def test_chain_refuses_a_residual_with_xnext():
    kernel, pack, (sx, so), lanes = step((1, 1), 8, 20)
    W = np.ones((8, 5), np.float32)
    with pytest.raises(ValueError, match="residual"):
        kernel(np.ones((20, 8), np.float32), *pack(W), None, np.ones((20, 5), np.float32), np.empty((0, 5), np.float32), C.ACT_NONE,
               aligned_empty(sx), aligned_empty(so), C.chain_workspace(20, 5, lanes), False, C.NO_ORDER)  # fmt: skip


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (1, 4)])
@pytest.mark.parametrize("M, parts", [(128, 2), (300, 3), (20, 1)])
def test_traversal_order_is_a_sorted_permutation(block, M, parts):
    rng = np.random.default_rng(5)
    K, N = 520, 700
    W = block_sparse_weight(rng, K, N, block, 0.1)
    r, c = block
    pack = pack_csr(W) if block == (1, 1) else pack_bsr(W, block)
    lanes = B.chunk_rows(c)
    indptr, indices, data, order = C.traversal_order(pack, N, c, M, lanes, parts)
    nbc = -(-N // c)
    assert indices.dtype == np.int16  # every row index fits: the narrow copy
    if c > 1:  # blocks wider than a column come in one panel, whose long segments keep their order
        assert order is C.NO_ORDER and indptr is pack[0] and data is pack[2] and np.array_equal(indices, pack[1])
        return
    npanel = order.shape[0] - 1
    assert list(order[npanel, :2]) == [-(-M // lanes), parts]
    order = order[:npanel, :nbc]
    counts = np.diff(indptr).reshape(npanel, nbc)
    # every panel visits each block column once, and the segments hold the same blocks
    old_counts = np.diff(pack[0]).reshape(npanel, nbc)
    for b in range(npanel):
        assert np.array_equal(np.sort(order[b]), np.arange(nbc))
        assert np.array_equal(counts[b], old_counts[b, order[b]])
        for jj in range(0, nbc, 37):
            q, q0 = b * nbc + jj, b * nbc + order[b, jj]
            assert np.array_equal(indices[indptr[q] : indptr[q + 1]], pack[1][pack[0][q0] : pack[0][q0 + 1]])
            assert np.array_equal(data[indptr[q] : indptr[q + 1]], pack[2][pack[0][q0] : pack[0][q0 + 1]])
    # no column leaves its task (in any row chunk), and between the tasks' edges the counts rise
    cuts = {0, nbc}
    for j0, nj in C.task_spans(nbc, c, -(-M // lanes), parts):
        for b in range(npanel):
            assert set(order[b, j0 : j0 + nj]) == set(range(j0, j0 + nj))
        cuts.update((j0, j0 + nj))
    cuts = sorted(cuts)
    for b in range(npanel):
        for a, e in zip(cuts[:-1], cuts[1:]):
            assert np.all(np.diff(counts[b, a:e]) >= 0)
    assert npanel > 1 and not np.array_equal(order[0], np.arange(nbc))  # something was reordered


def test_order_of_the_wrong_shape_or_split_is_refused():
    rng = np.random.default_rng(1)
    kernel, pack, (sx, so), lanes = step((1, 1), 300, 20)
    W = block_sparse_weight(rng, 300, 40, (1, 1), 0.3)
    xt, ot = aligned_empty(sx), aligned_empty((2,) + so[1:])
    x, out = np.ones((20, 300), np.float32), np.empty((20, 40), np.float32)
    with pytest.raises(ValueError, match="panels"):
        kernel(x, *pack(W), None, None, out, C.ACT_NONE, xt, ot, C.NO_NEXT, False, np.zeros((2, 3), np.int32))
    *packed, order = C.traversal_order(pack(W), 40, 1, 20, lanes, parts=3)  # made for three parts, run with two
    with pytest.raises(ValueError, match="parts"):
        kernel(x, *packed, None, None, out, C.ACT_NONE, xt, ot, C.NO_NEXT, False, order)
    *packed, order = C.traversal_order(pack(W), 40, 1, 200, lanes, parts=2)  # made for two row chunks
    with pytest.raises(ValueError, match="chunks"):
        kernel(x, *packed, None, None, out, C.ACT_NONE, xt, ot, C.NO_NEXT, False, order)
    *packed, order = C.traversal_order(pack(W), 40, 1, 20, lanes, parts=2)
    kernel(x, *packed, None, None, out, C.ACT_NONE, xt, ot, C.NO_NEXT, False, order)
    np.testing.assert_allclose(out, dense_ref(x, W), **tolerance("bsr", np.float32, 300))


def test_row_indices_past_int16_stay_int32():
    """A weight taller than 32767 rows keeps int32 row indices in the executor's copy, and the
    kernel (its int32 compilation) still matches the reference; below that they are int16."""
    rng = np.random.default_rng(3)
    K, N, M = 33000, 24, 20
    W = np.zeros((K, N), np.float32)
    rows = rng.choice(K, 60, replace=False)
    W[rows, rng.integers(0, N, 60)] = rng.uniform(-1, 1, 60)
    W[K - 1, 0] = 0.5  # the last row: an index past the int16 range
    kernel, pack, (sx, so), lanes = step((1, 1), K, M)
    *packed, order = C.traversal_order(pack(W), N, 1, M, lanes, parts=2)
    assert packed[1].dtype == np.int32
    assert C.narrow_indices(np.array([0, 32767], np.int32)).dtype == np.int16
    assert C.narrow_indices(np.array([0, 32768], np.int32)).dtype == np.int32
    x = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    out = np.empty((M, N), np.float32)
    kernel(x, *packed, None, None, out, C.ACT_NONE, aligned_empty(sx), aligned_empty((2,) + so[1:]), C.NO_NEXT, False, order)
    np.testing.assert_allclose(out, dense_ref(x, W), **tolerance("bsr", np.float32, K))
