"""The public Engine API: input forms, dim binding, plan cache, clear errors, thread safety.
Numbers are checked against onnxruntime on the same model."""

import threading

import numpy as np
import onnxruntime as ort
import pytest

from sparseinfer import Engine, InputError
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

PATH = "bert-token-classification/model.onnx"
ENTRY = manifest_entry(PATH)


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(FIXTURES / PATH), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def engine():
    return Engine(FIXTURES / PATH)


def _close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL)


def test_list_dict_call_and_mapped_run_agree_with_onnxruntime(engine, session):
    feeds = make_inputs(ENTRY, 2, 10)
    expected = session.run(None, feeds)
    as_list = [feeds[n] for n in engine.input_names]
    _close(engine.run(as_list), expected)
    _close(engine.run(feeds), expected)
    _close(engine(feeds), expected)
    mapped = engine.mapped_run(feeds)
    assert list(mapped) == engine.output_names == ["logits"]
    _close([mapped["logits"]], expected)


def test_description(engine):
    assert engine.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert engine.input_shapes == [("batch", "sequence")] * 3
    assert "input_ids" in repr(engine)


def test_batch_and_sequence_bound_at_construction(session):
    eng = Engine(FIXTURES / PATH, batch_size=2, sequence_length=16)
    assert eng.input_shapes == [(2, 16)] * 3
    assert eng.graph.info("logits").shape == (2, 16, 7)  # bound through the whole graph
    feeds = make_inputs(ENTRY, 2, 16)
    _close(eng.run(feeds), session.run(None, feeds))
    with pytest.raises(InputError, match="dim 1 is fixed to 16"):
        eng.run(make_inputs(ENTRY, 2, 8))
    with pytest.raises(InputError, match="dim 0 is fixed to 2"):
        eng.run(make_inputs(ENTRY, 3, 16))


def test_input_shapes_by_name_and_list(session):
    by_name = Engine(FIXTURES / PATH, input_shapes={"input_ids": [1, 8], "attention_mask": [1, 8], "token_type_ids": [1, 8]})
    by_list = Engine(FIXTURES / PATH, input_shapes=[[1, 8]] * 3)
    assert by_name.input_shapes == by_list.input_shapes == [(1, 8)] * 3
    feeds = make_inputs(ENTRY, 1, 8)
    _close(by_name.run(feeds), session.run(None, feeds))
    with pytest.raises(ValueError, match="not inputs"):
        Engine(FIXTURES / PATH, input_shapes={"ids": [1, 8]})
    with pytest.raises(ValueError, match="rank"):
        Engine(FIXTURES / PATH, input_shapes=[[1, 8, 1]] * 3)
    with pytest.raises(ValueError, match="3 inputs"):
        Engine(FIXTURES / PATH, input_shapes=[[1, 8]])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True])
def test_bad_construction_arguments(bad):
    with pytest.raises(ValueError, match="positive integer"):
        Engine(FIXTURES / PATH, batch_size=bad)


def test_open_dims_get_one_plan_per_shape(engine, session):
    for batch, seq in [(1, 4), (3, 7), (1, 4)]:
        feeds = make_inputs(ENTRY, batch, seq)
        _close(engine.run(feeds), session.run(None, feeds))
    assert {(1, 4), (3, 7)} <= {k[0] for k in engine._plans}


def test_wrong_input_name(engine):
    feeds = make_inputs(ENTRY, 1, 4)
    feeds["input_idz"] = feeds.pop("input_ids")
    with pytest.raises(InputError, match=r"unknown input\(s\) \['input_idz'\].*missing input\(s\) \['input_ids'\]"):
        engine.run(feeds)


def test_wrong_number_of_inputs(engine):
    feeds = make_inputs(ENTRY, 1, 4)
    with pytest.raises(InputError, match="takes 3"):
        engine.run([feeds["input_ids"]])
    with pytest.raises(InputError, match="list of arrays"):
        engine.run(feeds["input_ids"])


def test_wrong_dtype(engine):
    feeds = make_inputs(ENTRY, 1, 4)
    feeds["input_ids"] = feeds["input_ids"].astype(np.float32)
    with pytest.raises(InputError, match="input 'input_ids' expects int64 values, got float32"):
        engine.run(feeds)


def test_lossless_integer_widths_are_accepted(engine, session):
    feeds = make_inputs(ENTRY, 1, 5)
    narrow = {k: v.astype(np.int32) for k, v in feeds.items()}
    _close(engine.run(narrow), session.run(None, feeds))
    narrow["input_ids"] = np.full((1, 5), 2**63, np.uint64)  # does not fit int64: refused, not wrapped
    with pytest.raises(InputError, match="out of range for int64"):
        engine.run(narrow)


def test_wrong_rank(engine):
    feeds = make_inputs(ENTRY, 1, 4)
    feeds["attention_mask"] = feeds["attention_mask"][0]
    with pytest.raises(InputError, match="input 'attention_mask' must have rank 2"):
        engine.run(feeds)


def test_inconsistent_symbolic_dims(engine):
    feeds = make_inputs(ENTRY, 2, 6)
    feeds["attention_mask"] = feeds["attention_mask"][:, :5]
    with pytest.raises(InputError, match="disagree on dim 'sequence'"):
        engine.run(feeds)


def test_token_id_out_of_vocabulary_is_a_clear_error(engine):
    feeds = make_inputs(ENTRY, 1, 4)
    feeds["input_ids"][0, 2] = 10_000
    with pytest.raises(IndexError, match="10000 is out of range"):
        engine.run(feeds)


def test_concurrent_runs_from_threads_give_identical_results(engine):
    """Several threads share one engine (and race to build plans for new shapes)."""
    shapes = [(1, 6), (2, 9), (1, 6), (3, 5)] * 3
    reference = {s: engine.run(make_inputs(ENTRY, *s, seed=s[0] * 100 + s[1])) for s in set(shapes)}
    fresh = Engine(FIXTURES / PATH)
    results, errors = {}, []

    def work(i, shape):
        try:
            results[i] = fresh.run(make_inputs(ENTRY, *shape, seed=shape[0] * 100 + shape[1]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(shapes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, shape in enumerate(shapes):
        for a, b in zip(results[i], reference[shape]):
            np.testing.assert_array_equal(a, b)


def test_num_threads_does_not_leak_into_the_callers_setting():
    """Numba's thread count is per calling thread: an engine pinned to one thread must not leave
    the caller (or a later engine without num_threads) at one thread."""
    import numba

    before = numba.get_num_threads()
    Engine(FIXTURES / PATH, num_threads=1).run(make_inputs(ENTRY, 1, 4))
    assert numba.get_num_threads() == before
