"""The pure token-classification post-processing functions on hand-made arrays.

Labels are the fixtures' own: 0 O, 1 B-PER, 2 I-PER, 3 B-ORG, 4 I-ORG, 5 B-LOC, 6 I-LOC. Words are
joined by the WordPiece decoder of the tokenizers library (what Hugging Face's
convert_tokens_to_string calls for BERT), so "##" continuations attach to the word before them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import decoders

from sparseinfer.tasks.token_classification import (
    Entity,
    TokenScores,
    aggregate_word,
    aggregate_words,
    group_entities,
    is_subword,
    label_scores,
    split_tag,
    token_entities,
    token_scores,
)

ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-ORG", 4: "I-ORG", 5: "B-LOC", 6: "I-LOC"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}
DECODE = decoders.WordPiece().decode


def scores_for(**probs: float) -> np.ndarray:
    """A 7-label score vector with the given label probabilities, the rest shared by the others."""
    out = np.zeros(len(ID2LABEL))
    for label, p in probs.items():
        out[LABEL2ID[label.replace("_", "-")]] = p
    rest = [i for i in range(len(out)) if out[i] == 0]
    out[rest] = (1.0 - out.sum()) / len(rest)
    return out


def tok(word: str, start: int, end: int, index: int, sub: bool = False, **probs: float) -> TokenScores:
    return TokenScores(word=word, scores=scores_for(**probs), start=start, end=end, index=index, is_subword=sub)


def ent(label: str, score: float, word: str, start: int, end: int) -> Entity:
    return Entity(label, score, word, start, end)


def test_label_scores_is_a_softmax():
    # exp(0) : exp(ln 3) = 1 : 3.
    np.testing.assert_allclose(label_scores(np.array([[0.0, math.log(3.0)]])), [[0.25, 0.75]], rtol=1e-12)


@pytest.mark.parametrize(
    ("label", "parts"),
    [("B-PER", ("B", "PER")), ("I-LOC", ("I", "LOC")), ("O", ("I", "O")), ("PER", ("I", "PER")), ("B-MISC-X", ("B", "MISC-X"))],
)
def test_split_tag(label, parts):
    assert split_tag(label) == parts


# --------------------------------------------------------------------------- sub-words
@pytest.mark.parametrize(
    ("token", "start", "end", "text", "expected"),
    [
        ("##ing", 4, 7, "walking", True),  # 5 characters of token for 3 of text
        ("walk", 0, 4, "walking", False),
        ("cafe", 0, 4, "café", False),  # accents stripped, same length: still a word start
    ],
)
def test_is_subword_with_a_continuation_marking_tokenizer(token, start, end, text, expected):
    assert is_subword(token, start, end, text, word_aware=True) is expected


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (0, False),  # the start of the text
        (2, True),  # "w" in "New": text[1:3] = "ew" has no space
        (4, False),  # "York": text[3:5] = " Y" has one
        (3, False),  # a token starting at the space itself (byte-level "Ġ" pieces)
    ],
)
def test_is_subword_heuristic_without_continuation_marks(start, expected):
    assert is_subword("?", start, start + 1, "New York", word_aware=False) is expected


def test_token_scores_skips_special_tokens_and_spells_out_unknown_tokens():
    # [CLS] new ##ark [UNK] [SEP] for "newark東": the special tokens are dropped; the unknown token's
    # word is the text it covers, and it never continues a word.
    text = "newark東"
    tokens = ["[CLS]", "new", "##ark", "[UNK]", "[SEP]"]
    ids = [2, 10, 11, 1, 3]
    offsets = [(0, 0), (0, 3), (3, 6), (6, 7), (0, 0)]
    special = [1, 0, 0, 0, 1]
    scores = label_scores(np.zeros((5, 7)))
    out = token_scores(tokens, ids, offsets, special, scores, text, word_aware=True, unk_id=1)
    assert [(t.word, t.start, t.end, t.index, t.is_subword) for t in out] == [
        ("new", 0, 3, 1, False),
        ("##ark", 3, 6, 2, True),
        ("東", 6, 7, 3, False),  # "[UNK]" (5 characters) vs "東" (1) would say sub-word without the rule
    ]


def test_token_entities_take_the_best_label():
    out = token_entities([tok("maria", 0, 5, 1, B_PER=0.9), tok("##s", 5, 6, 2, sub=True, I_LOC=0.6)], ID2LABEL)
    assert [(e.entity, e.word, e.index) for e in out] == [("B-PER", "maria", 1), ("I-LOC", "##s", 2)]
    assert [e.score for e in out] == pytest.approx([0.9, 0.6])


# --------------------------------------------------------------------------- words
# One word "lopez" in two tokens: "lo" says B-PER 0.6 (I-PER 0.3), "##pez" says I-PER 0.9 (B-PER 0.05).
WORD = [tok("lo", 6, 8, 3, B_PER=0.6, I_PER=0.3), tok("##pez", 8, 11, 4, sub=True, B_PER=0.05, I_PER=0.9)]


def test_aggregate_word_first():
    # The first token's best label and score: B-PER 0.6; the word spans both tokens.
    e = aggregate_word(WORD, "first", ID2LABEL, DECODE)
    assert (e.entity, e.word, e.start, e.end) == ("B-PER", "lopez", 6, 11)
    assert e.score == pytest.approx(0.6)


def test_aggregate_word_max():
    # "##pez" has the highest single score (0.9 > 0.6): its label I-PER.
    e = aggregate_word(WORD, "max", ID2LABEL, DECODE)
    assert (e.entity, e.score) == ("I-PER", pytest.approx(0.9))


def test_aggregate_word_average():
    # Mean scores: B-PER (0.6 + 0.05) / 2 = 0.325, I-PER (0.3 + 0.9) / 2 = 0.6 → I-PER 0.6.
    e = aggregate_word(WORD, "average", ID2LABEL, DECODE)
    assert (e.entity, e.score) == ("I-PER", pytest.approx(0.6))


def test_aggregate_word_max_ties_go_to_the_first_token():
    tied = [tok("a", 0, 1, 1, B_ORG=0.8), tok("##b", 1, 2, 2, sub=True, B_LOC=0.8)]
    assert aggregate_word(tied, "max", ID2LABEL, DECODE).entity == "B-ORG"


def test_aggregate_words_splits_at_tokens_that_are_not_subwords():
    # maria | lo ##pez: two words, the second made of two tokens.
    tokens = [tok("maria", 0, 5, 1, B_PER=0.9), *WORD]
    words = aggregate_words(tokens, "first", ID2LABEL, DECODE)
    assert [(w.word, w.entity, w.start, w.end, w.index) for w in words] == [
        ("maria", "B-PER", 0, 5, None),
        ("lopez", "B-PER", 6, 11, None),
    ]


def test_aggregate_words_rejects_token_strategies():
    with pytest.raises(ValueError, match="'first', 'average' or 'max'"):
        aggregate_words(WORD, "simple", ID2LABEL, DECODE)


# --------------------------------------------------------------------------- groups
def test_group_entities_b_and_i_rules():
    entities = [
        ent("B-PER", 0.9, "maria", 0, 5),
        ent("I-PER", 0.7, "lopez", 6, 11),  # same tag, not B-: joins maria
        ent("B-PER", 0.8, "ana", 12, 15),  # B- always starts a group, even after PER
        ent("I-LOC", 0.6, "in", 16, 18),  # another tag: new group
        ent("O", 0.5, "the", 19, 22),  # O is an I- of tag "O": its own group...
        ent("O", 0.7, "city", 23, 27),  # ...which the next O joins
        ent("I-LOC", 0.4, "lima", 28, 32),  # I- after O starts a LOC group
    ]
    groups = group_entities(entities, DECODE)
    assert [(g.entity, g.word, g.start, g.end, g.index) for g in groups] == [
        ("PER", "maria lopez", 0, 11, None),
        ("PER", "ana", 12, 15, None),
        ("LOC", "in", 16, 18, None),
        ("O", "the city", 19, 27, None),
        ("LOC", "lima", 28, 32, None),
    ]
    # Mean scores: (0.9 + 0.7) / 2, 0.8, 0.6, (0.5 + 0.7) / 2, 0.4.
    assert [g.score for g in groups] == pytest.approx([0.8, 0.8, 0.6, 0.6, 0.4])


def test_group_entities_compares_with_the_previous_member_not_the_first():
    # I-PER, I-ORG, I-ORG: the two ORGs group; the group's tag comes from its first member.
    groups = group_entities([ent("I-PER", 1.0, "a", 0, 1), ent("I-ORG", 1.0, "b", 2, 3), ent("I-ORG", 1.0, "c", 4, 5)], DECODE)
    assert [(g.entity, g.word) for g in groups] == [("PER", "a"), ("ORG", "b c")]


def test_group_entities_joins_subword_tokens_with_the_decoder():
    # The "simple" strategy groups tokens, so "##" pieces are glued by the WordPiece decoder.
    groups = group_entities([ent("B-LOC", 1.0, "sao", 0, 3), ent("I-LOC", 1.0, "pa", 4, 6), ent("I-LOC", 1.0, "##ulo", 6, 9)], DECODE)
    assert [(g.entity, g.word, g.start, g.end) for g in groups] == [("LOC", "sao paulo", 0, 9)]


def test_group_entities_of_nothing_is_nothing():
    assert group_entities([], DECODE) == []
