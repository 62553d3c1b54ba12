"""Embeddings against Hugging Face (tests/fixtures/hf_outputs/embeddings.json).

The reference is `transformers.pipeline("feature-extraction")` on the sequence-classification
fixtures (their base encoder), pooled with sentence-transformers' definitions by
scripts/hf_reference/embeddings.py. The sparseinfer pipeline runs the same ONNX files, cut at the
encoder output. Vectors must agree within HF_ATOL with a cosine similarity of at least
HF_EMBEDDING_MIN_COSINE, on bert, distilbert and roberta, for every pooling mode, with and without
normalization. The sentence-transformers layout (modules.json, 1_Pooling/config.json, 2_Normalize)
is exercised on a copy of a fixture directory made in a temporary directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparseinfer.tasks import EmbeddingsOutput, EmbeddingsPipeline, Pipeline, TruncationWarning
from sparseinfer.tasks.embeddings import POOLING_MODES, normalize_rows, pool, read_sentence_transformers_config
from tests.conftest import FIXTURES
from tests.tolerances import HF_ATOL, HF_EMBEDDING_MIN_COSINE

REFERENCE = json.loads((FIXTURES.parent / "hf_outputs" / "embeddings.json").read_text(encoding="utf-8"))
ARCHS = tuple(REFERENCE["models"])
BUCKETS = [16, 32, 64, 128]


def model_dir(arch: str) -> Path:
    return FIXTURES / REFERENCE["models"][arch]["model_dir"]


def text_cases(arch: str) -> list[dict]:
    return [c for c in REFERENCE["models"][arch]["cases"] if c["name"].startswith("text_")]


def case(arch: str, name: str) -> dict:
    return next(c for c in REFERENCE["models"][arch]["cases"] if c["name"] == name)


def assert_close(ours, want) -> None:
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, rtol=0, atol=HF_ATOL)
    cosine = (ours * want).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(want, axis=-1))
    assert np.all(cosine >= HF_EMBEDDING_MIN_COSINE), cosine


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalize", [False, True])
def test_every_pooling_matches_hf(arch, normalize):
    cases = text_cases(arch)
    texts = [c["inputs"] for c in cases]
    for mode in POOLING_MODES:
        pipe = Pipeline.create(
            "sentence_embeddings", model_dir(arch), pooling=mode, normalize=normalize, sequence_length=BUCKETS, batch_size=4, num_threads=1
        )
        out = pipe(texts)
        key = f"{mode}_normalized" if normalize else mode
        assert_close(out.embeddings, [c["output"][key] for c in cases])
        if normalize:
            assert np.allclose(np.linalg.norm(out.embeddings, axis=-1), 1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_defaults_single_text_and_aliases(arch):
    pipe = Pipeline.create("feature-extraction", model_dir(arch), num_threads=1)  # mean, not normalized, 128
    assert isinstance(pipe, EmbeddingsPipeline) and pipe.pooling == ("mean",) and pipe.normalize is False
    c = text_cases(arch)[0]
    out = pipe(c["inputs"])
    assert isinstance(out, EmbeddingsOutput) and len(out.embeddings) == 1
    assert_close(out.embeddings, [c["output"]["mean"]])
    np.testing.assert_allclose(pipe(inputs=[c["inputs"]]).embeddings, out.embeddings, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_matches_hf_truncation_true(arch):
    c = case(arch, "truncated_32")
    assert c["kwargs"]["tokenize_kwargs"] == {"truncation": True, "max_length": 32} and c["tokens"] == 32
    pipe = Pipeline.create("embeddings", model_dir(arch), sequence_length=[16, 32], num_threads=1)
    with pytest.warns(TruncationWarning):
        out = pipe(c["inputs"])
    assert_close(out.embeddings, [c["output"]["mean"]])
    strict = Pipeline.create("embeddings", model_dir(arch), sequence_length=32, truncation=False, num_threads=1)
    with pytest.raises(ValueError, match="longer than the largest sequence_length 32"):
        strict(c["inputs"])


def sentence_transformers_dir(tmp_path: Path, arch: str, pooling: dict, normalize: bool, extra: list[dict] = ()) -> Path:
    """A copy of a fixture directory with a sentence-transformers layout added."""
    d = tmp_path / f"{arch}-st"
    shutil.copytree(model_dir(arch), d)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (d / "2_Normalize").mkdir()
    modules += list(extra)
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir()
    config = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        **pooling,
    }
    (d / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_sentence_transformers_config_is_read(tmp_path, arch):
    d = sentence_transformers_dir(tmp_path, arch, {"pooling_mode_cls_token": True}, normalize=True)
    pipe = Pipeline.create("embeddings", d, sequence_length=BUCKETS, batch_size=2, num_threads=1)
    assert pipe.pooling == ("cls",) and pipe.normalize is True
    cases = text_cases(arch)
    assert_close(pipe([c["inputs"] for c in cases]).embeddings, [c["output"]["cls_normalized"] for c in cases])
    # an explicit argument wins over the layout
    explicit = Pipeline.create("embeddings", d, pooling="max", normalize=False, num_threads=1)
    assert_close(explicit(cases[0]["inputs"]).embeddings, [cases[0]["output"]["max"]])


def test_sentence_transformers_several_modes_concatenate(tmp_path):
    d = sentence_transformers_dir(tmp_path, "bert", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, normalize=False)
    assert read_sentence_transformers_config(d) == (("max", "mean"), False)
    pipe = Pipeline.create("embeddings", d, num_threads=1)
    c = text_cases("bert")[1]
    assert_close(pipe(c["inputs"]).embeddings, [c["output"]["max"] + c["output"]["mean"]])  # sentence-transformers order


def test_sentence_transformers_unsupported_layouts_are_errors(tmp_path):
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    d = sentence_transformers_dir(tmp_path, "bert", {"pooling_mode_mean_tokens": True}, normalize=False, extra=[dense])
    with pytest.raises(ValueError, match="Dense"):
        Pipeline.create("embeddings", d, num_threads=1)
    config = json.loads((d / "1_Pooling" / "config.json").read_text())
    (d / "modules.json").write_text(json.dumps(json.loads((d / "modules.json").read_text())[:2]))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="enables no pooling mode"):
        Pipeline.create("embeddings", d, num_threads=1)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_lasttoken": True}))
    with pytest.raises(ValueError, match="does not support"):
        Pipeline.create("embeddings", d, num_threads=1)


def test_bad_options():
    with pytest.raises(ValueError, match="pooling must be one of"):
        Pipeline.create("embeddings", model_dir("bert"), pooling="median")


# --------------------------------------------------------------------------- pure post-processing
def test_pool_definitions():
    h = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(pool(h, mask, "cls"), h[:, 0])
    np.testing.assert_allclose(pool(h, mask, "mean"), [[1.0, 2.0], [6.0, 7.0]])
    np.testing.assert_allclose(pool(h, mask, "max"), [[2.0, 3.0], [6.0, 7.0]])  # padding never wins
    np.testing.assert_allclose(pool(h, mask, "mean_sqrt_len"), [[2.0 / np.sqrt(2), 4.0 / np.sqrt(2)], [6.0, 7.0]])
    np.testing.assert_allclose(pool(-h, mask, "max"), [[0.0, -1.0], [-6.0, -7.0]])
    assert pool(h, mask, ("cls", "mean")).shape == (2, 4)
    np.testing.assert_allclose(normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]])
