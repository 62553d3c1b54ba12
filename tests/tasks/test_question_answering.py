"""Question answering against the Hugging Face pipeline (tests/fixtures/hf_outputs/question_answering.json).

Every recorded case runs on bert, distilbert and roberta with the window length HF used as the largest
bucket (a smaller bucket below it, and batch_size 3, so windows go through several buckets and padded
chunks): answers, their order and character spans must be equal, scores within HF_ATOL.

One known difference: when a context has fewer distinct answers than top_k, HF fills its list with
spans it scores exactly 0 (reversed, or through [CLS]); this pipeline returns only real answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparseinfer.tasks import Pipeline
from sparseinfer.tasks.base import TASKS
from sparseinfer.tasks.question_answering import QuestionAnsweringOutput, QuestionAnsweringPipeline, span_scores
from tests.conftest import FIXTURES
from tests.tolerances import HF_ATOL, MODEL_RTOL

REFERENCE = json.loads((FIXTURES.parent / "hf_outputs" / "question_answering.json").read_text(encoding="utf-8"))
ARCHS = tuple(REFERENCE["models"])
CASE_NAMES = [c["name"] for c in REFERENCE["models"][ARCHS[0]]["cases"]]
# HF keyword → this pipeline's (max_seq_len is the pipeline's largest bucket instead).
RENAMED = {"max_answer_len": "max_answer_length"}


def model_dir(arch: str) -> Path:
    return FIXTURES / REFERENCE["models"][arch]["model_dir"]


def case(arch: str, name: str) -> dict:
    return next(c for c in REFERENCE["models"][arch]["cases"] if c["name"] == name)


@pytest.fixture(scope="module")
def pipelines():
    cache: dict = {}

    def get(arch: str, max_seq_len: int) -> QuestionAnsweringPipeline:
        if (arch, max_seq_len) not in cache:
            cache[arch, max_seq_len] = QuestionAnsweringPipeline(
                model_dir(arch), sequence_length=[max_seq_len // 2, max_seq_len], batch_size=3, num_threads=1
            )
        return cache[arch, max_seq_len]

    return get


def call_kwargs(c: dict) -> dict:
    kwargs = {RENAMED.get(k, k): v for k, v in c["kwargs"].items() if k != "max_seq_len"}
    return {**c["inputs"], **kwargs}


def as_lists(ours, hf, batched: bool) -> list[tuple[list, list]]:
    """(our answers, HF's answers) per question, each a list best first."""
    pairs = list(zip(ours, hf)) if batched else [(ours, hf)]
    return [(o if isinstance(o, list) else [o], h if isinstance(h, list) else [h]) for o, h in pairs]


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hugging_face(pipelines, arch, name):
    c = case(arch, name)
    pipe = pipelines(arch, c["effective"]["max_seq_len"])
    assert pipe.options["doc_stride"] == min(pipe.max_length // 2, 128)  # HF's default, used unless the case sets one
    result = pipe(**call_kwargs(c))
    top_k = c["kwargs"].get("top_k", 1)
    batched = isinstance(c["inputs"]["question"], list)
    assert isinstance(result, list) == (batched or top_k > 1)
    for ours, hf in as_lists(result, c["output"], batched):
        assert all(isinstance(a, QuestionAnsweringOutput) for a in ours)
        real = [h for h in hf if h["score"] > 0.0]
        assert all(h["score"] == 0.0 for h in hf[len(real) :])  # HF's filler comes last
        assert [(a.answer, a.start, a.end) for a in ours] == [(h["answer"], h["start"], h["end"]) for h in real]
        np.testing.assert_allclose([a.score for a in ours], [h["score"] for h in real], rtol=0, atol=HF_ATOL)
        context = c["inputs"]["context"] if isinstance(c["inputs"]["context"], str) else None
        if context is not None:
            assert all(context[a.start : a.end] == a.answer for a in ours)


def test_zero_score_filler_is_the_only_difference():
    # The tiny context "Hilo" has one distinct answer; HF pads top_k=3 with two zero-score spans.
    hf = case("bert", "tiny_context_top3")["output"]
    assert [h["score"] == 0.0 for h in hf] == [False, True, True]


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_answer_score_matches_hugging_face(pipelines, arch):
    # HF's min over windows of p_start[CLS] · p_end[CLS], recorded even when the empty answer is not
    # returned; tiny (down to 1e-24) for most cases, so compared relatively.
    recorded = [c for c in REFERENCE["models"][arch]["cases"] if "null_score" in c]
    assert len(recorded) >= 4
    for c in recorded:
        pipe = pipelines(arch, c["effective"]["max_seq_len"])
        inputs = pipe.parse(**call_kwargs(c))
        feeds, (windows, opts) = pipe.tokenize(inputs)
        out = pipe.run_engine(feeds)
        nulls = [
            span_scores(out["start_logits"][r, : w.p_mask.size], out["end_logits"][r, : w.p_mask.size], w.p_mask, 15, 1, True)[3]
            for r, w in enumerate(windows)
        ]
        np.testing.assert_allclose(min(nulls), c["null_score"], rtol=HF_ATOL, atol=0, err_msg=c["name"])


def test_long_contexts_use_several_windows(pipelines):
    c = case("bert", "long_small_windows")
    pipe = pipelines("bert", 64)
    feeds, (windows, opts) = pipe.tokenize(pipe.parse(**call_kwargs(c)))
    assert len(windows) > 4 and opts["doc_stride"] == 32
    assert feeds["input_ids"].shape == (len(windows), 64)
    # Consecutive windows share doc_stride context tokens.
    for a, b in zip(windows, windows[1:]):
        ctx_a = a.encoding.ids[len(a.encoding.ids) - 1 - 32 : -1]
        ctx_b = [t for t, s in zip(b.encoding.ids, b.sequence_ids) if s == 1][:32]
        assert ctx_a == ctx_b


def test_registered_as_qa():
    assert TASKS.lookup("qa") is QuestionAnsweringPipeline
    assert TASKS.lookup("question_answering") is QuestionAnsweringPipeline


def test_create_by_alias(pipelines):
    pipe = Pipeline.create("qa", model_dir("distilbert"), sequence_length=64, num_threads=1, top_k=2, max_answer_length=3)
    reference = pipelines("distilbert", 64)
    kwargs = {"question": "Who bakes?", "context": "Her cousin Ana bakes every morning before sunrise."}
    # Options set at construction equal the same options given per call (scores up to rounding: the
    # two pipelines pad to different buckets).
    ours, theirs = pipe(**kwargs), reference(**kwargs, top_k=2, max_answer_length=3)
    assert len(ours) == 2
    assert [(a.answer, a.start, a.end) for a in ours] == [(a.answer, a.start, a.end) for a in theirs]
    np.testing.assert_allclose([a.score for a in ours], [a.score for a in theirs], rtol=MODEL_RTOL)


def test_doc_stride_too_large_is_a_clear_error(pipelines):
    pipe = pipelines("bert", 64)
    with pytest.raises(ValueError, match=r"doc_stride=60 must be less than the \d+ context tokens"):
        pipe(question="Who opened the café?", context="Maria Lopez opened a small café.", doc_stride=60)


def test_long_questions_are_cut_to_max_question_length(pipelines):
    pipe = pipelines("bert", 64)
    question = "Who opened the small café on Hanover Street in the spring of last year, and why?"
    _, (windows, _) = pipe.tokenize(pipe.parse(question=question, context="Maria Lopez did.", max_question_length=5))
    assert [int((w.sequence_ids == 0).sum()) for w in windows] == [5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": ["a?", "b?"], "context": ["x", "y", "z"]}, "2 question"),
        ({"question": "a?", "context": "   "}, "must not be empty"),
        ({"question": "a?", "context": "x", "top_k": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_inputs(pipelines, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipelines("bert", 64)(**kwargs)
