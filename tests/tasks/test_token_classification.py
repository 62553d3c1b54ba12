"""Token classification against the Hugging Face pipeline (tests/fixtures/hf_outputs/token_classification.json).

Every recorded case (five texts under each aggregation strategy, other ignore_labels, a batch and a
text longer than 128 tokens) runs on bert, distilbert and roberta: labels, words, character spans and
token indices must be equal, scores within HF_ATOL. Pipelines use buckets [32, 128] and batch_size 2.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparseinfer.tasks import Pipeline, TruncationWarning
from sparseinfer.tasks.base import TASKS
from sparseinfer.tasks.token_classification import TokenClassificationOutput, TokenClassificationPipeline
from tests.conftest import FIXTURES
from tests.tolerances import HF_ATOL, MODEL_RTOL

REFERENCE = json.loads((FIXTURES.parent / "hf_outputs" / "token_classification.json").read_text(encoding="utf-8"))
ARCHS = tuple(REFERENCE["models"])
CASE_NAMES = [c["name"] for c in REFERENCE["models"][ARCHS[0]]["cases"]]


def model_dir(arch: str) -> Path:
    return FIXTURES / REFERENCE["models"][arch]["model_dir"]


def case(arch: str, name: str) -> dict:
    return next(c for c in REFERENCE["models"][arch]["cases"] if c["name"] == name)


@pytest.fixture(scope="module")
def pipelines():
    cache: dict = {}

    def get(arch: str) -> TokenClassificationPipeline:
        if arch not in cache:
            cache[arch] = TokenClassificationPipeline(model_dir(arch), sequence_length=[32, 128], batch_size=2, num_threads=1)
        return cache[arch]

    return get


def run(pipe: TokenClassificationPipeline, c: dict) -> TokenClassificationOutput:
    long = c["name"].startswith("long/")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        if long:  # HF truncates at model_max_length = 128 silently; this pipeline says so
            with pytest.warns(TruncationWarning):
                return pipe(c["inputs"], **c["kwargs"])
        return pipe(c["inputs"], **c["kwargs"])


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hugging_face(pipelines, arch, name):
    c = case(arch, name)
    out = run(pipelines(arch), c)
    hf_rows = c["output"] if isinstance(c["inputs"], list) else [c["output"]]
    assert len(out.predictions) == len(hf_rows)
    grouped = c["kwargs"]["aggregation_strategy"] != "none"
    for ours, hf in zip(out.predictions, hf_rows):
        want = [(h["entity_group"] if grouped else h["entity"], h["word"], h["start"], h["end"], h.get("index")) for h in hf]
        assert [(r.entity, r.word, r.start, r.end, r.index) for r in ours] == want
        assert all(r.is_grouped == grouped for r in ours)
        np.testing.assert_allclose([r.score for r in ours], [h["score"] for h in hf], rtol=0, atol=HF_ATOL)


def test_cases_cover_subwords_and_every_strategy():
    # The recorded texts must exercise word merging: some "first" words span several tokens.
    strategies = {c["kwargs"]["aggregation_strategy"] for c in REFERENCE["models"]["bert"]["cases"]}
    assert strategies == {"none", "simple", "first", "average", "max"}
    none = case("bert", "long_words/none")["output"]
    assert any(h["word"].startswith("##") for h in none)


def test_registered_as_ner():
    assert TASKS.lookup("ner") is TokenClassificationPipeline
    assert TASKS.lookup("token-classification") is TokenClassificationPipeline


def test_options_at_construction_equal_options_per_call(pipelines):
    pipe = Pipeline.create("ner", model_dir("bert"), sequence_length=32, num_threads=1, aggregation_strategy="max", ignore_labels=[])
    text = "Maria Lopez opened a small café."
    ours, theirs = pipe(text).predictions[0], pipelines("bert")(text, aggregation_strategy="max", ignore_labels=[]).predictions[0]
    assert [(r.entity, r.word, r.start, r.end) for r in ours] == [(r.entity, r.word, r.start, r.end) for r in theirs]
    assert any(r.entity == "O" for r in ours)  # ignore_labels=[] keeps the O groups
    # Scores up to rounding: the two pipelines pad to different buckets.
    np.testing.assert_allclose([r.score for r in ours], [r.score for r in theirs], rtol=MODEL_RTOL)
    assert pipe(inputs=[text]).predictions == pipe(text).predictions


def test_default_is_no_aggregation_without_o(pipelines):
    out = pipelines("roberta")("Maria Lopez opened a small café.")
    assert out.predictions[0] and all(r.index is not None and not r.is_grouped and r.entity != "O" for r in out.predictions[0])


def test_bad_strategy_is_rejected(pipelines):
    with pytest.raises(ValueError, match="aggregation_strategy"):
        pipelines("bert")("text", aggregation_strategy="longest")
    with pytest.raises(ValueError, match="aggregation_strategy must be one of"):
        TokenClassificationPipeline(model_dir("bert"), sequence_length=32, aggregation_strategy="longest")
