"""Text classification against the Hugging Face pipeline (tests/fixtures/hf_outputs/text_classification.json).

Every recorded case runs on bert, distilbert and roberta: labels (and their order) must be equal,
scores within HF_ATOL. Pipelines run with buckets [16, 32, 64, 128] and small batch sizes, so the cases
also go through several buckets and a padded last chunk.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparseinfer.tasks import Pipeline, TextClassificationOutput, TruncationWarning
from sparseinfer.tasks.text_classification import choose_function, class_scores, top_labels
from tests.conftest import FIXTURES
from tests.tolerances import HF_ATOL

REFERENCE = json.loads((FIXTURES.parent / "hf_outputs" / "text_classification.json").read_text(encoding="utf-8"))
ARCHS = tuple(REFERENCE["models"])
BUCKETS = [16, 32, 64, 128]


def model_dir(arch: str) -> Path:
    return FIXTURES / REFERENCE["models"][arch]["model_dir"]


def cases(arch: str, prefix: str) -> list[dict]:
    return [c for c in REFERENCE["models"][arch]["cases"] if c["name"].startswith(prefix)]


def case(arch: str, name: str) -> dict:
    return next(c for c in REFERENCE["models"][arch]["cases"] if c["name"] == name)


def as_sequences(inputs):
    """A recorded HF input as the `sequences` field: {"text", "text_pair"} dicts become [a, b] lists."""
    if isinstance(inputs, list):
        return [[x["text"], x["text_pair"]] if isinstance(x, dict) else x for x in inputs]
    return inputs


def as_rows(output) -> list[list[dict]]:
    """An HF result as one list of {label, score} per input: the legacy single dict, a list of dicts
    (one input) or a list of lists (a batch)."""
    if isinstance(output, dict):
        return [[output]]
    if output and isinstance(output[0], dict):
        return [output]
    return output


def assert_matches(ours: TextClassificationOutput, hf_rows: list[list[dict]], top_k: int | None) -> None:
    assert len(ours.labels) == len(ours.scores) == len(hf_rows)
    for labels, scores, want in zip(ours.labels, ours.scores, hf_rows):
        if top_k == 1:
            assert isinstance(labels, str) and isinstance(scores, float)
            labels, scores = [labels], [scores]
        assert labels == [w["label"] for w in want]
        np.testing.assert_allclose(scores, [w["score"] for w in want], rtol=0, atol=HF_ATOL)


@pytest.fixture(scope="module")
def pipelines():
    cache: dict = {}

    def get(arch: str, **kwargs) -> Pipeline:
        kwargs.setdefault("sequence_length", BUCKETS)
        kwargs.setdefault("num_threads", 1)
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = Pipeline.create("text-classification", model_dir(arch), **kwargs)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_single_texts_default_and_top1(arch, pipelines):
    pipe = pipelines(arch)  # top_k=1 and batch_size=1 are the defaults
    for c in cases(arch, "default_") + cases(arch, "top1_"):
        assert_matches(pipe(c["inputs"]), as_rows(c["output"]), top_k=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_texts_all_labels(arch, pipelines):
    pipe = pipelines(arch, top_k=None, batch_size=4)
    for c in cases(arch, "all_"):
        assert_matches(pipe(sequences=c["inputs"]), as_rows(c["output"]), top_k=None)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_through_buckets_and_chunks(arch, pipelines):
    c = case(arch, "batch")
    texts = c["inputs"]
    for batch_size in (1, 4):  # 4: chunks of 4, 4 and a last one of 2 filled up to 4
        pipe = pipelines(arch, batch_size=batch_size)
        out = pipe(texts)
        assert_matches(out, as_rows(c["output"]), top_k=1)
    lengths = [len(e.ids) for e in pipe.encode(texts)]
    assert len({pipe.bucket_for(n) for n in lengths}) >= 2, lengths  # the case does go through several buckets


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_2_batch(arch, pipelines):
    c = case(arch, "top2_batch")
    assert_matches(pipelines(arch, top_k=2, batch_size=3)(c["inputs"]), as_rows(c["output"]), top_k=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_sentence_pairs(arch, pipelines):
    c = case(arch, "pairs")
    pipe = pipelines(arch, top_k=None, batch_size=4)
    out = pipe(as_sequences(c["inputs"]))
    assert_matches(out, as_rows(c["output"]), top_k=None)
    # one pair on its own, as a batch of one
    first = pipe([as_sequences(c["inputs"])[0]])
    assert first.labels == out.labels[:1] and np.allclose(first.scores, out.scores[:1], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_sigmoid(arch, pipelines):
    c = case(arch, "sigmoid")
    out = pipelines(arch, top_k=None, function_to_apply="sigmoid", batch_size=2)(c["inputs"])
    assert_matches(out, as_rows(c["output"]), top_k=None)


def test_multi_label_config_selects_sigmoid(tmp_path):
    arch = "bert"
    d = tmp_path / "multi-label"
    shutil.copytree(model_dir(arch), d)
    config = json.loads((d / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (d / "config.json").write_text(json.dumps(config))
    pipe = Pipeline.create("text-classification", d, top_k=None, num_threads=1)
    assert pipe.function == "sigmoid"
    c = case(arch, "sigmoid")
    assert_matches(pipe(c["inputs"]), as_rows(c["output"]), top_k=None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["truncated_32", "pairs_truncated_32"])
def test_truncation_matches_hf_truncation_true(arch, name, pipelines):
    c = case(arch, name)
    assert c["kwargs"]["max_length"] == 32
    pipe = pipelines(arch, top_k=None, sequence_length=[16, 32], batch_size=2)
    with pytest.warns(TruncationWarning, match="truncated"):
        out = pipe(as_sequences(c["inputs"]))
    assert_matches(out, as_rows(c["output"]), top_k=None)


def test_truncation_off_is_an_error(pipelines):
    c = case("bert", "truncated_32")
    pipe = pipelines("bert", sequence_length=32, truncation=False)
    with pytest.raises(ValueError, match="longer than the largest sequence_length 32"):
        pipe(c["inputs"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("short enough")  # no warning when nothing is cut


# --------------------------------------------------------------------------- pure post-processing
def test_choose_function_follows_hf_rules():
    three = {"id2label": {"0": "a", "1": "b", "2": "c"}}
    assert choose_function(three) == "softmax"
    assert choose_function({**three, "problem_type": "multi_label_classification"}) == "sigmoid"
    assert choose_function({**three, "problem_type": "single_label_classification"}) == "softmax"
    assert choose_function({"id2label": {"0": "score"}}) == "sigmoid"  # a single logit
    assert choose_function({**three, "problem_type": "regression"}) == "none"
    assert choose_function(three, "SIGMOID") == "sigmoid"
    with pytest.raises(ValueError, match="function_to_apply"):
        choose_function(three, "tanh")


def test_class_scores_and_top_labels():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 2.0]])
    probs = class_scores(logits, "softmax")
    assert np.isfinite(probs).all() and np.allclose(probs.sum(-1), 1)
    labels, scores = top_labels(probs, {0: "a", 1: "b", 2: "c"}, 1)
    assert labels == ["a", "c"] and scores[0] == pytest.approx(1.0)
    labels, scores = top_labels(probs, {0: "a", 1: "b", 2: "c"}, None)
    assert labels == [["a", "b", "c"], ["c", "a", "b"]]  # ties keep label order
    labels, _ = top_labels(probs, {0: "a", 1: "b", 2: "c"}, 5)
    assert labels[1] == ["c", "a", "b"]
    assert class_scores(np.array([[0.0]]), "sigmoid")[0, 0] == pytest.approx(0.5)


def test_single_string_output_is_a_list_of_one(pipelines):
    out = pipelines("bert")("Good.")
    assert isinstance(out, TextClassificationOutput)
    assert len(out.labels) == 1 and isinstance(out.labels[0], str) and 0 < out.scores[0] <= 1
    # [text] lists are single texts, as in DeepSparse
    again = pipelines("bert")([["Good."]])
    assert again.labels == out.labels and again.scores == pytest.approx(out.scores, abs=1e-6)
