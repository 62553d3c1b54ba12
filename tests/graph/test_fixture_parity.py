"""Every exported fixture model gives onnxruntime's outputs through our importer + Engine."""

import numpy as np
import onnxruntime as ort
import pytest

from sparseinfer import Engine
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

SHAPES = [(1, 1), (1, 16), (2, 9), (3, 32), (4, 128)]  # (batch, sequence); 128 = max positions


@pytest.mark.parametrize("path", model_ids())
def test_matches_onnxruntime(path):
    entry = manifest_entry(path)
    engine = Engine(FIXTURES / path)
    session = ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"])
    assert engine.input_names == [i.name for i in session.get_inputs()]
    assert engine.output_names == [o.name for o in session.get_outputs()]
    for batch, seq in SHAPES:
        feeds = make_inputs(entry, batch, seq, seed=batch * 1000 + seq)
        ours = engine.run(feeds)
        theirs = session.run(None, feeds)
        for name, a, b in zip(engine.output_names, ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
            np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL, err_msg=f"{path} {name} batch={batch} seq={seq}")


@pytest.mark.parametrize("path", ["bert-sequence-classification/model.onnx", "roberta-token-classification/model-opset14.onnx"])
def test_padding_does_not_leak(path):
    """A padded row gives the same result as the same row run alone without its padding
    (the attention mask really masks); the oracle is onnxruntime on the unpadded row."""
    entry = manifest_entry(path)
    engine = Engine(FIXTURES / path)
    session = ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"])
    feeds = make_inputs(entry, 3, 12, seed=7)
    padded = engine.run(feeds)
    row = 2
    length = int(feeds["attention_mask"][row].sum())
    alone = {k: v[row : row + 1, :length] for k, v in feeds.items()}
    expected = session.run(None, alone)
    for name, full, ref in zip(engine.output_names, padded, expected):
        got = full[row : row + 1]
        if got.ndim >= 2 and got.shape[1] == feeds["input_ids"].shape[1]:  # per-token outputs: compare real tokens
            got = got[:, :length]
        np.testing.assert_allclose(got, ref, atol=MODEL_ATOL, rtol=MODEL_RTOL, err_msg=name)
