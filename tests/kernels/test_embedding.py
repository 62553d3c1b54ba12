"""Embedding + LayerNorm and mask-row kernels against the Embedding / AttentionMaskRow references."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels.embedding import attention_mask_row, embedding_layernorm, embedding_layernorm_serial, pad_terms
from sparseinfer.kernels.norm import layernorm
from tests.tolerances import tolerance

KERNELS = [embedding_layernorm, embedding_layernorm_serial]


def _case(seed, m, n, sizes):
    rng = np.random.default_rng(seed)
    tables = tuple((rng.standard_normal((v, n)) * 0.5).astype(np.float32) for v in sizes)
    ids = tuple(rng.integers(-v, v, m).astype(np.int64) for v in sizes)  # negative ids count from the end
    gamma = rng.standard_normal(n).astype(np.float32)
    beta = rng.standard_normal(n).astype(np.float32)
    return ids, tables, gamma, beta


def _run(kernel, ids, tables, gamma, beta, eps):
    out = np.full((ids[0].shape[0], tables[0].shape[1]), np.nan, np.float32)
    assert kernel(*pad_terms(ids, tables), gamma, beta, np.float32(eps), out) == -1
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 40),
    n=st.integers(1, 100),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),  # 1..MAX_TERMS tables
    eps=st.sampled_from([1e-12, 1e-5]),
)
@example(seed=0, m=1, n=1, sizes=[1], eps=1e-12)
@example(seed=1, m=33, n=64, sizes=[50, 2, 33], eps=1e-12)
def test_kernel_matches_reference_and_the_layernorm_kernel(seed, m, n, sizes, eps):
    ids, tables, gamma, beta = _case(seed, m, n, sizes)
    operands = [a for pair in zip(tables, ids) for a in pair]
    want = reference.embedding(gamma, beta, *operands, terms=("gather",) * len(sizes), epsilon=eps)
    # the sum as the Gather/Add steps compute it, then today's LayerNorm kernel: bit-identical
    total = tables[0][ids[0]]
    for t, i in zip(tables[1:], ids[1:]):
        total = total + t[i]
    exact = layernorm(total, gamma, beta, eps)
    for kernel in KERNELS:
        got = _run(kernel, ids, tables, gamma, beta, eps)
        np.testing.assert_allclose(got, want, **tolerance("layernorm"))
        np.testing.assert_array_equal(got, exact)


def test_parallel_and_serial_kernels_agree_on_many_rows():
    ids, tables, gamma, beta = _case(3, 300, 96, [1000, 2, 300])
    np.testing.assert_array_equal(
        _run(embedding_layernorm, ids, tables, gamma, beta, 1e-12), _run(embedding_layernorm_serial, ids, tables, gamma, beta, 1e-12)
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [7, -8, 1 << 40])
def test_out_of_range_index_is_reported_and_nothing_written(kernel, bad):
    ids, tables, gamma, beta = _case(0, 5, 4, [7, 3])
    ids[1][3] = bad if bad != 7 else 3  # the second table has 3 rows
    if bad == 7:
        ids[0][4] = 7
    out = np.zeros((5, 4), np.float32)
    pos = kernel(*pad_terms(ids, tables), gamma, beta, np.float32(1e-5), out)
    assert pos == (4 if bad == 7 else 5 + 3)
    assert not out.any()


@pytest.mark.parametrize("mode", ["where", "mul"])
@pytest.mark.parametrize("value", [-3.4028234663852886e38, -10000.0, float("-inf")])
def test_mask_row_matches_reference_bitwise(mode, value):
    rng = np.random.default_rng(0)
    info = np.iinfo(np.int64)
    odd = np.array([0, 1, 2, -1, 3, 1 << 24, (1 << 24) + 1, info.max, info.min], np.int64)
    for mask in (rng.integers(0, 2, (3, 17)), np.resize(odd, (2, 9)), np.ones((1, 1), np.int64)):
        want = reference.attention_mask_row(mask, mode=mode, value=value)
        got = np.full(mask.shape, np.nan, np.float32)
        attention_mask_row(mask, mode == "where", np.float32(value), got)
        np.testing.assert_array_equal(got.reshape(want.shape).view(np.uint32), want.view(np.uint32))


def test_more_terms_than_the_kernel_takes_is_an_error():
    ids, tables, _, _ = _case(0, 3, 4, [2] * 5)
    with pytest.raises(ValueError, match="1..4"):
        pad_terms(ids, tables)
