"""The pure question-answering post-processing functions on hand-made arrays.

Most tests use one 6-token window laid out as Hugging Face lays out a (question, context) pair:

    position:      0      1    2      3    4    5
    token:         [CLS]  q    [SEP]  c1   c2   [SEP]
    p_mask:        0      1    1      0    0    1        (context and [CLS] may be used)

with logits chosen as logarithms of the probabilities wanted over the unmasked positions 0, 3, 4
(masked positions get large logits, which must not matter).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from sparseinfer.tasks.question_answering import (
    QuestionAnsweringOutput,
    best_answers,
    context_room,
    encode_windows,
    masked_softmax,
    merge_answer,
    span_scores,
    token_span_to_chars,
    window_features,
)
from tests.conftest import FIXTURES

P_MASK = np.array([False, True, True, False, False, True])
# p_start over (CLS, c1, c2) = (0.1, 0.6, 0.3); p_end = (0.1, 0.2, 0.7). Masked positions get 50.
START = np.array([math.log(0.1), 50.0, 50.0, math.log(0.6), math.log(0.3), 50.0])
END = np.array([math.log(0.1), 50.0, 50.0, math.log(0.2), math.log(0.7), 50.0])


def test_masked_softmax_ignores_masked_positions():
    # exp of the unmasked logits log(0.1), log(0.6), log(0.3) sums to 1, so they come back unchanged;
    # the masked positions (logit -10000 after masking) get exactly 0.
    p = masked_softmax(START, P_MASK)
    np.testing.assert_allclose(p, [0.1, 0, 0, 0.6, 0.3, 0], rtol=1e-12, atol=0)
    assert p[P_MASK].tolist() == [0.0, 0.0, 0.0]


def test_best_span_and_ranking():
    # Spans inside the context (s <= e, both in {3, 4}): (3,3) = 0.6·0.2 = 0.12, (3,4) = 0.6·0.7 = 0.42,
    # (4,4) = 0.3·0.7 = 0.21. (4,3) is reversed and spans through [CLS] are never answers.
    starts, ends, scores, null = span_scores(START, END, P_MASK, max_answer_length=15, top_k=10)
    assert list(zip(starts.tolist(), ends.tolist())) == [(3, 4), (4, 4), (3, 3)]
    np.testing.assert_allclose(scores, [0.42, 0.21, 0.12], rtol=1e-12)
    assert null is None  # handle_impossible is off


def test_top_k_cuts_the_list():
    starts, ends, scores, _ = span_scores(START, END, P_MASK, max_answer_length=15, top_k=2)
    assert list(zip(starts.tolist(), ends.tolist())) == [(3, 4), (4, 4)]


def test_max_answer_length_cuts_long_spans():
    # max_answer_length=1 allows e - s < 1: single tokens only, so the best span (3,4) = 0.42 goes and
    # (4,4) = 0.21 leads (3,3) = 0.12.
    starts, ends, scores, _ = span_scores(START, END, P_MASK, max_answer_length=1, top_k=10)
    assert list(zip(starts.tolist(), ends.tolist())) == [(4, 4), (3, 3)]
    np.testing.assert_allclose(scores, [0.21, 0.12], rtol=1e-12)


def test_impossible_answer_score_is_cls_start_times_cls_end():
    # p_start[CLS] · p_end[CLS] = 0.1 · 0.1; the spans keep their scores (CLS stays in the softmax).
    _, _, scores, null = span_scores(START, END, P_MASK, max_answer_length=15, top_k=10, handle_impossible=True)
    assert null == pytest.approx(0.01, rel=1e-12)
    np.testing.assert_allclose(scores, [0.42, 0.21, 0.12], rtol=1e-12)


def test_cls_is_never_a_span_even_when_most_likely():
    # [CLS] gets p_start = p_end = 0.98 here, yet only the context spans come back, scored with the
    # probabilities that include [CLS] in the softmax: (3,3) = 0.01 · 0.01.
    start = np.array([math.log(0.98), 0, 0, math.log(0.01), math.log(0.01), 0])
    starts, ends, scores, null = span_scores(start, start, P_MASK, max_answer_length=15, top_k=10, handle_impossible=True)
    assert 0 not in starts.tolist() + ends.tolist()
    assert null == pytest.approx(0.98 * 0.98, rel=1e-12)
    assert scores[0] == pytest.approx(0.01 * 0.01, rel=1e-9)


def test_no_context_token_gives_no_span():
    p_mask = np.array([False, True, True])
    starts, ends, scores, _ = span_scores(np.zeros(3), np.zeros(3), p_mask, max_answer_length=15, top_k=5)
    assert starts.size == ends.size == scores.size == 0


# --------------------------------------------------------------------------- character spans
# Question "where" and context "Hilo town" tokenized as [CLS] where [SEP] hi ##lo town [SEP]; the
# question's word 0 ("where") must not be mistaken for the context's word 0 ("hilo").
OFFSETS = np.array([(0, 0), (0, 5), (0, 0), (0, 2), (2, 4), (5, 9), (0, 0)])
WORDS = np.array([-1, 0, -1, 0, 0, 1, -1])
SEQS = np.array([-1, 0, -1, 1, 1, 1, -1])


@pytest.mark.parametrize(
    ("span", "chars"),
    [
        ((4, 4), (0, 4)),  # "##lo" widens to its word "Hilo"
        ((3, 3), (0, 4)),  # so does "hi"
        ((4, 5), (0, 9)),  # "##lo town" → "Hilo town"
        ((5, 5), (5, 9)),  # "town" is a word of its own
    ],
)
def test_token_span_widens_to_words(span, chars):
    assert token_span_to_chars(OFFSETS, WORDS, SEQS, *span) == chars


def test_word_cut_by_the_window_edge_stays_cut():
    # A later window starting at "##lo": [CLS] where [SEP] ##lo town [SEP]. The word "hilo" only has
    # "##lo" (chars 2..4) in this window, so that is all the answer can cover.
    offsets = np.array([(0, 0), (0, 5), (0, 0), (2, 4), (5, 9), (0, 0)])
    words = np.array([-1, 0, -1, 0, 1, -1])
    seqs = np.array([-1, 0, -1, 1, 1, -1])
    assert token_span_to_chars(offsets, words, seqs, 3, 3) == (2, 4)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_token_span_to_chars_agrees_with_the_tokenizer(arch):
    # Oracle: the tokenizers library's own Encoding.word_to_chars (what Hugging Face calls), on every
    # (start, end) pair of context tokens of every window of a text with accents and sub-words.
    tok = Tokenizer.from_file(str(FIXTURES / f"{arch}-question-answering" / "tokenizer.json"))
    tok.enable_truncation(24, stride=6, strategy="only_second")
    context = "Zürich hosts São Paulo's naïve delegation; extraordinarily, 東京 sent nobody."
    windows = encode_windows(tok, [("Who came?", context)])[0]
    assert len(windows) > 2
    for enc in windows:
        w = window_features(0, enc, None)
        ctx = np.flatnonzero(w.sequence_ids == 1)
        for s in ctx:
            for e in ctx[ctx >= s]:
                want = (enc.word_to_chars(enc.token_to_word(s), 1)[0], enc.word_to_chars(enc.token_to_word(e), 1)[1])
                assert token_span_to_chars(w.offsets, w.word_ids, w.sequence_ids, int(s), int(e)) == want


# --------------------------------------------------------------------------- windows
def test_window_features_mask_everything_but_context_and_cls():
    tok = Tokenizer.from_file(str(FIXTURES / "bert-question-answering" / "tokenizer.json"))
    enc = tok.encode("who came?", "maria lopez")
    cls_id = tok.token_to_id("[CLS]")
    w = window_features(3, enc, cls_id)
    assert w.example == 3
    # Position 0 is [CLS] (kept), then question tokens and [SEP]s (masked) and the context (kept).
    expected = [s != 1 for s in enc.sequence_ids]
    expected[0] = False
    assert w.p_mask.tolist() == expected
    assert w.sequence_ids.tolist() == [-1 if s is None else s for s in enc.sequence_ids]


def test_context_room_counts_question_and_special_tokens():
    # A BERT pair is [CLS] q [SEP] c [SEP]: 3 special tokens, so 64 - len(q) - 3 context tokens fit.
    tok = Tokenizer.from_file(str(FIXTURES / "bert-question-answering" / "tokenizer.json"))
    n_question = len(tok.encode("who opened the cafe?", add_special_tokens=False).ids)
    assert context_room(tok, "who opened the cafe?", 64) == 64 - n_question - 3


# --------------------------------------------------------------------------- merging and ranking
def answer(text: str, score: float, start: int = 0, end: int = 0) -> QuestionAnsweringOutput:
    return QuestionAnsweringOutput(answer=text, score=score, start=start, end=end)


def test_merge_answer_adds_scores_of_the_same_text_ignoring_case():
    # "Paris" (0.3 at 0..5) and "paris" (0.2 at 20..25) are one answer of score 0.5 at the first one's
    # position; "Lyon" stays apart.
    answers: list[QuestionAnsweringOutput] = []
    merge_answer(answers, answer("Paris", 0.3, 0, 5))
    merge_answer(answers, answer("Lyon", 0.1, 10, 14))
    merge_answer(answers, answer("paris", 0.2, 20, 25))
    assert [(a.answer, a.start, a.end) for a in answers] == [("Paris", 0, 5), ("Lyon", 10, 14)]
    assert answers[0].score == pytest.approx(0.5)


def test_best_answers_with_the_empty_answer_competing():
    # Scores 0.4, 0.1 and the empty answer's 0.2: the empty answer ranks second.
    found = [answer("a", 0.4), answer("b", 0.1)]
    ranked = best_answers(found, top_k=3, null_score=0.2)
    assert [(a.answer, a.score) for a in ranked] == [("a", 0.4), ("", 0.2), ("b", 0.1)]
    assert (ranked[1].start, ranked[1].end) == (0, 0)
    assert [a.answer for a in best_answers(found, top_k=1, null_score=0.9)] == [""]
    assert [a.answer for a in best_answers(found, top_k=5)] == ["a", "b"]  # no empty answer without a score


def test_best_answers_ties_keep_their_order():
    found = [answer("first", 0.25), answer("second", 0.25), answer("third", 0.5)]
    assert [a.answer for a in best_answers(found, top_k=3)] == ["third", "first", "second"]
