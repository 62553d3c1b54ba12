"""Token classification (alias: ner): a label per token, or per word / entity when aggregated.

Semantics of the Hugging Face v4 pipeline (`transformers.pipelines.token_classification`):

- Each token (special tokens skipped) gets softmax scores over the labels. Its `word` is the token
  string, or the text it covers for the unknown token.
- A token is a sub-word (continues the previous word) when the tokenizer marks continuations (a
  WordPiece `##` prefix) and the token string is not the text it covers; otherwise, by a heuristic,
  when the character before it is not a space (and it does not start the text).
- `aggregation_strategy`: "none" gives one result per token with its best label; "simple" groups
  runs of tokens; "first", "average" and "max" first merge each word's tokens into one (the label of
  the first token / of the averaged scores / of the token with the highest score), then group.
- Grouping joins an entity to the previous one when their tags match (the label without its B-/I-
  prefix; a label without a prefix counts as I-) and it is not a B- label. A group takes the first
  member's tag and the mean score; its word is the tokenizer's decoding of its members.
- Results whose label (or group tag) is in `ignore_labels` (default ["O"]) are dropped after grouping.

Texts longer than the largest sequence length are truncated to it (with a TruncationWarning).

Output, in the DeepSparse schema: `predictions` holds one list of `TokenClassificationResult` per
text; grouped results carry the group tag in `entity`, `index=None` and `is_grouped=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from tokenizers import Encoding

from .base import NonEmptyStr, Pipeline, register_task

__all__ = [
    "AGGREGATION_STRATEGIES",
    "Entity",
    "TokenClassificationInput",
    "TokenClassificationOutput",
    "TokenClassificationPipeline",
    "TokenClassificationResult",
    "TokenScores",
    "aggregate_word",
    "aggregate_words",
    "group_entities",
    "is_subword",
    "label_scores",
    "split_tag",
    "token_entities",
    "token_scores",
]

AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
Strategy = Literal["none", "simple", "first", "average", "max"]


class TokenClassificationInput(BaseModel):
    inputs: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(description="A text or a list of texts")
    aggregation_strategy: Strategy | None = Field(None, description="How tokens are merged (default: the pipeline's)")
    ignore_labels: list[str] | None = Field(None, description="Labels / group tags to drop (default: the pipeline's)")


class TokenClassificationResult(BaseModel):
    entity: str = Field(description="The label (B-PER, ...), or the group tag (PER, ...) of a grouped result")
    score: float = Field(description="Its probability; for a group, the mean over its members")
    word: str = Field(description="The token string, or the decoded words of a group")
    start: int | None = Field(description="Character offset in the text")
    end: int | None = Field(description="Character offset just past it")
    index: int | None = Field(None, description="Position of the token in the tokenized text (None when grouped)")
    is_grouped: bool = Field(False, description="Whether this result groups tokens")


class TokenClassificationOutput(BaseModel):
    predictions: list[list[TokenClassificationResult]] = Field(description="One list of results per input text, in batch order")


# --------------------------------------------------------------------------- pure post-processing
@dataclass
class TokenScores:
    """One non-special token: its string, label scores, character span and position."""

    word: str
    scores: np.ndarray
    start: int
    end: int
    index: int
    is_subword: bool


@dataclass
class Entity:
    """A labelled token, word or group."""

    entity: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


def label_scores(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def is_subword(token: str, start: int, end: int, text: str, word_aware: bool) -> bool:
    """Whether a token continues the previous word. With a tokenizer that marks continuations
    (`word_aware`), a token whose string differs in length from the text it covers ("##ing" for
    "ing"); otherwise a token not at the start of the text with no space just before or at it."""
    if word_aware:
        return len(token) != len(text[start:end])
    return start > 0 and " " not in text[start - 1 : start + 1]


def token_scores(
    tokens: Sequence[str],
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    scores: np.ndarray,
    text: str,
    word_aware: bool,
    unk_id: int | None,
) -> list[TokenScores]:
    """The non-special tokens of one text with their scores; the unknown token takes the text it
    covers as its word and never counts as a sub-word."""
    out = []
    for i, (token, token_id, (a, b)) in enumerate(zip(tokens, ids, offsets)):
        if special[i]:
            continue
        sub = is_subword(token, a, b, text, word_aware)
        if unk_id is not None and token_id == unk_id:
            token, sub = text[a:b], False
        out.append(TokenScores(word=token, scores=scores[i], start=a, end=b, index=i, is_subword=sub))
    return out


def token_entities(tokens: Sequence[TokenScores], id2label: dict[int, str]) -> list[Entity]:
    """Each token with its best label."""
    out = []
    for t in tokens:
        best = int(np.argmax(t.scores))
        out.append(Entity(id2label[best], float(t.scores[best]), t.word, t.start, t.end, t.index))
    return out


def aggregate_word(tokens: Sequence[TokenScores], strategy: str, id2label: dict[int, str], decode: Callable[[list[str]], str]) -> Entity:
    """One word from its tokens: the best label of the first token ("first"), of the token with the
    highest score, the first such on ties ("max"), or of the mean scores ("average")."""
    if strategy == "first":
        scores = tokens[0].scores
    elif strategy == "max":
        scores = max(tokens, key=lambda t: t.scores.max()).scores
    elif strategy == "average":
        scores = np.nanmean(np.stack([t.scores for t in tokens]), axis=0)
    else:
        raise ValueError(f"word aggregation needs the 'first', 'average' or 'max' strategy, got {strategy!r}")
    best = int(np.argmax(scores))
    return Entity(id2label[best], float(scores[best]), decode([t.word for t in tokens]), tokens[0].start, tokens[-1].end)


def aggregate_words(
    tokens: Sequence[TokenScores], strategy: str, id2label: dict[int, str], decode: Callable[[list[str]], str]
) -> list[Entity]:
    """Tokens → words: a word is a token and the sub-word tokens after it."""
    words: list[list[TokenScores]] = []
    for t in tokens:
        if words and t.is_subword:
            words[-1].append(t)
        else:
            words.append([t])
    return [aggregate_word(w, strategy, id2label, decode) for w in words]


def split_tag(label: str) -> tuple[str, str]:
    """("B" or "I", tag) of a label: "B-PER" → ("B", "PER"); a label without a prefix is an I-."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def group_entities(entities: Sequence[Entity], decode: Callable[[list[str]], str]) -> list[Entity]:
    """Runs of adjacent entities with the same tag, a B- label starting a new run; each run becomes
    one entity with the tag of its first member (after the first "-"), the mean score, the decoded
    words and the span from its first to its last member."""
    runs: list[list[Entity]] = []
    for e in entities:
        bi, tag = split_tag(e.entity)
        if runs and bi != "B" and tag == split_tag(runs[-1][-1].entity)[1]:
            runs[-1].append(e)
        else:
            runs.append([e])
    return [
        Entity(
            entity=run[0].entity.split("-", 1)[-1],
            score=float(np.nanmean([e.score for e in run])),
            word=decode([e.word for e in run]),
            start=run[0].start,
            end=run[-1].end,
        )
        for run in runs
    ]


# --------------------------------------------------------------------------- the pipeline
@register_task
class TokenClassificationPipeline(Pipeline):
    """`Pipeline.create("ner", model_dir, aggregation_strategy="simple")("a text")`.

    Options (each may also be given per call): `aggregation_strategy` "none" (HF's default),
    `ignore_labels` ["O"]."""

    task = "token-classification"
    aliases = ("ner",)
    input_schema = TokenClassificationInput
    output_schema = TokenClassificationOutput

    def __init__(
        self, model_path, *, aggregation_strategy: Strategy = "none", ignore_labels: Sequence[str] = ("O",), **kwargs: Any
    ) -> None:
        super().__init__(model_path, **kwargs)
        self.aggregation_strategy = self._strategy(aggregation_strategy)
        self.ignore_labels = list(ignore_labels)
        if not self.id2label:
            raise ValueError(f"{str(self.model_dir / 'config.json')!r} has no id2label: a token-classification model needs its label names")
        # Continuation-marking tokenizers (WordPiece "##") tell sub-words apart exactly.
        self.word_aware = bool(getattr(self.tokenizer.model, "continuing_subword_prefix", None))
        self.unk_id = self._unk_id()

    @staticmethod
    def _strategy(value: str) -> str:
        name = str(value).lower()
        if name not in AGGREGATION_STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {AGGREGATION_STRATEGIES}, got {value!r}")
        return name

    def _unk_id(self) -> int | None:
        names = [
            self.special_tokens.get("unk_token"),
            self.tokenizer_config.get("unk_token"),
            getattr(self.tokenizer.model, "unk_token", None),
        ]
        for token in names:
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        return None

    def decode(self, tokens: list[str]) -> str:
        """Token strings → text, as the tokenizer's decoder joins them (HF convert_tokens_to_string)."""
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def tokenize(self, inputs: TokenClassificationInput) -> tuple[dict[str, np.ndarray], Any]:
        texts = [inputs.inputs] if isinstance(inputs.inputs, str) else list(inputs.inputs)
        encodings, _ = self.encode_fitting(texts)
        return self.feeds_from_encodings(encodings), (texts, encodings)

    def postprocess(self, outputs: dict[str, np.ndarray], context: Any, inputs: TokenClassificationInput) -> TokenClassificationOutput:
        texts, encodings = context
        logits = outputs.get("logits", next(iter(outputs.values())))
        if logits.ndim != 3 or logits.shape[2] != len(self.id2label):
            raise ValueError(
                f"the model's output has shape {list(logits.shape)}, but config.json names {len(self.id2label)} labels: "
                "is this a token-classification model?"
            )
        strategy = self._strategy(inputs.aggregation_strategy or self.aggregation_strategy)
        ignore = self.ignore_labels if inputs.ignore_labels is None else inputs.ignore_labels
        predictions = []
        for row, (text, enc) in enumerate(zip(texts, encodings)):
            entities = self.entities(text, enc, logits[row, : len(enc.ids)], strategy)
            grouped = strategy != "none"
            predictions.append(
                [
                    TokenClassificationResult(
                        entity=e.entity, score=e.score, word=e.word, start=e.start, end=e.end, index=e.index, is_grouped=grouped
                    )
                    for e in entities
                    if e.entity not in ignore
                ]
            )
        return TokenClassificationOutput(predictions=predictions)

    def entities(self, text: str, encoding: Encoding, logits: np.ndarray, strategy: str) -> list[Entity]:
        """One text's entities under `strategy`, before `ignore_labels` is applied."""
        tokens = token_scores(
            encoding.tokens,
            encoding.ids,
            encoding.offsets,
            encoding.special_tokens_mask,
            label_scores(logits),
            text,
            self.word_aware,
            self.unk_id,
        )
        if strategy == "none":
            return token_entities(tokens, self.id2label)
        if strategy == "simple":
            words = token_entities(tokens, self.id2label)
        else:
            words = aggregate_words(tokens, strategy, self.id2label, self.decode)
        return group_entities(words, self.decode)
