"""Extractive question answering (alias: qa): the span of the context that answers the question.

Semantics of the Hugging Face v4 pipeline (`transformers.pipelines.question_answering`):

- The (question, context) pair is cut into windows of at most `sequence_length` tokens (the largest
  bucket) by the tokenizer's own truncation (`only_second`, overlapping by `doc_stride` tokens).
- Per window, start and end logits outside the context are set to -10000 (the first token, [CLS],
  stays in), each is softmaxed over the window, and a span (s, e) scores p_start[s] · p_end[e] for
  s ≤ e < s + `max_answer_length` with both ends in the context.
- The 2·top_k + 10 best spans of each window are widened to whole words (the words of their first and
  last tokens, as far as they lie in the window) and become context[start:end]; answers with the same
  text (ignoring case) are merged, across windows too, by adding their scores.
- With `handle_impossible_answer`, the empty answer scores the smallest p_start[CLS] · p_end[CLS] over
  the windows and competes with the others.

Where Hugging Face fills a short list with zero-score spans it holds impossible (reversed, or through
[CLS]), this pipeline returns fewer than `top_k` answers.

Output, in the DeepSparse schema: one `QuestionAnsweringOutput(answer, score, start, end)` per
question, a list of them (best first) when `top_k > 1`, and a list of those for batched questions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, model_validator
from tokenizers import Encoding, Tokenizer

from .base import NonEmptyStr, Pipeline, register_task

__all__ = [
    "QuestionAnsweringInput",
    "QuestionAnsweringOutput",
    "QuestionAnsweringPipeline",
    "Window",
    "best_answers",
    "context_room",
    "encode_windows",
    "masked_softmax",
    "merge_answer",
    "span_scores",
    "token_span_to_chars",
    "window_features",
]

# Logit given to positions that cannot be in an answer, as Hugging Face does (set, not added).
MASKED_LOGIT = -10000.0

PositiveInt = Annotated[int, Field(ge=1)]


class QuestionAnsweringInput(BaseModel):
    question: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(description="A question or a list of them")
    context: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        description="The text to find the answer in: one for all questions, or one per question"
    )
    top_k: PositiveInt | None = Field(None, description="Answers per question (default: the pipeline's)")
    doc_stride: Annotated[int, Field(ge=0)] | None = Field(None, description="Tokens shared by consecutive windows")
    max_answer_length: PositiveInt | None = Field(None, description="Longest answer, in tokens")
    max_question_length: PositiveInt | None = Field(None, description="Questions are cut to this many tokens")
    handle_impossible_answer: bool | None = Field(None, description="Let the empty answer compete")

    @model_validator(mode="after")
    def _same_lengths(self) -> QuestionAnsweringInput:
        if isinstance(self.context, list):
            n = len(self.question) if isinstance(self.question, list) else 1
            if len(self.context) != n:
                raise ValueError(f"got {n} question(s) and {len(self.context)} contexts: give one context, or one per question")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """(question, context) per example, a single context shared by every question."""
        questions = self.question if isinstance(self.question, list) else [self.question]
        contexts = self.context if isinstance(self.context, list) else [self.context] * len(questions)
        return list(zip(questions, contexts))


class QuestionAnsweringOutput(BaseModel):
    answer: str = Field(description="The answer: context[start:end] ('' for no answer)")
    score: float = Field(description="Its probability (summed over the spans that give the same text)")
    start: int = Field(description="Character offset of the answer in the context")
    end: int = Field(description="Character offset just past the answer")


# --------------------------------------------------------------------------- tokenization
@dataclass(frozen=True)
class Window:
    """One window of a (question, context) pair, as arrays of its unpadded length n."""

    example: int  # index of its (question, context) pair
    encoding: Encoding  # ids, masks and type ids for the engine
    p_mask: np.ndarray  # [n] bool: True where the token cannot be in an answer
    offsets: np.ndarray  # [n, 2] character offsets, into the context for context tokens
    word_ids: np.ndarray  # [n] word index within its sequence, -1 for special tokens
    sequence_ids: np.ndarray  # [n] 0 question, 1 context, -1 special tokens


def window_features(example: int, encoding: Encoding, cls_id: int | None) -> Window:
    """The arrays post-processing needs from one window. Every token outside the context is masked
    except the classifier token, which stands for "no answer"."""
    sequence_ids = np.array([-1 if s is None else s for s in encoding.sequence_ids], np.int64)
    p_mask = sequence_ids != 1
    if cls_id is not None:
        p_mask &= np.asarray(encoding.ids) != cls_id
    return Window(
        example=example,
        encoding=encoding,
        p_mask=p_mask,
        offsets=np.array(encoding.offsets, np.int64).reshape(-1, 2),
        word_ids=np.array([-1 if w is None else w for w in encoding.word_ids], np.int64),
        sequence_ids=sequence_ids,
    )


def context_room(tokenizer: Tokenizer, question: str, max_length: int) -> int:
    """Context tokens that fit in a window of `max_length` beside `question` and the special tokens."""
    n_question = len(tokenizer.encode(question, add_special_tokens=False).ids)
    return max_length - n_question - tokenizer.num_special_tokens_to_add(True)


def encode_windows(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[Encoding]]:
    """Per (question, context) pair, its windows in order. `tokenizer` must already truncate
    `only_second` with the stride (see `QuestionAnsweringPipeline._window_tokenizer`)."""
    return [[e, *e.overflowing] for e in tokenizer.encode_batch(pairs)]


# --------------------------------------------------------------------------- span scoring
def masked_softmax(logits: np.ndarray, p_mask: np.ndarray) -> np.ndarray:
    """Softmax over a window (float64) with the masked positions' logits set to -10000."""
    x = np.where(p_mask, MASKED_LOGIT, np.asarray(logits, np.float64))
    e = np.exp(x - x.max())
    return e / e.sum()


def span_scores(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    p_mask: np.ndarray,
    max_answer_length: int,
    top_k: int,
    handle_impossible: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
    """The `top_k` best spans of one window: (starts, ends, scores) best first, and the empty
    answer's score p_start[0] · p_end[0] when `handle_impossible` (else None).

    A span (s, e) scores p_start[s] · p_end[e]; it must have s ≤ e < s + max_answer_length, both ends
    unmasked and neither at position 0 (the classifier token). Ties keep the (s, e) order."""
    p_start = masked_softmax(start_logits, p_mask)
    p_end = masked_softmax(end_logits, p_mask)
    null = float(p_start[0] * p_end[0]) if handle_impossible else None
    allowed = ~np.asarray(p_mask, bool)
    allowed[0] = False
    n = allowed.size
    s, e = np.indices((n, n))
    valid = allowed[:, None] & allowed[None, :] & (e >= s) & (e - s < max_answer_length)
    flat = np.flatnonzero(valid)
    scores = np.outer(p_start, p_end).ravel()[flat]
    order = np.argsort(-scores, kind="stable")[:top_k]
    starts, ends = np.unravel_index(flat[order], (n, n))
    return starts, ends, scores[order], null


def token_span_to_chars(offsets: np.ndarray, word_ids: np.ndarray, sequence_ids: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Character span of tokens start..end widened to whole words: from the first token of the start
    token's word to the last token of the end token's word, among this window's context tokens
    (a word cut by the window edge is cut too). Tokens without a word keep their own offsets."""
    ws, we = int(word_ids[start]), int(word_ids[end])
    if ws < 0 or we < 0:
        return int(offsets[start, 0]), int(offsets[end, 1])
    in_context = sequence_ids == 1
    first = int(np.flatnonzero(in_context & (word_ids == ws))[0])
    last = int(np.flatnonzero(in_context & (word_ids == we))[-1])
    return int(offsets[first, 0]), int(offsets[last, 1])


def merge_answer(answers: list[QuestionAnsweringOutput], answer: QuestionAnsweringOutput) -> None:
    """Add `answer` to `answers`, or its score to an earlier answer with the same text (ignoring
    case), which keeps its own text and position."""
    key = answer.answer.lower()
    for known in answers:
        if known.answer.lower() == key:
            known.score += answer.score
            return
    answers.append(answer)


def best_answers(answers: list[QuestionAnsweringOutput], top_k: int, null_score: float | None = None) -> list[QuestionAnsweringOutput]:
    """The `top_k` best answers, best first (ties keep their order), the empty answer competing
    with score `null_score` unless it is None."""
    pool = list(answers)
    if null_score is not None:
        pool.append(QuestionAnsweringOutput(answer="", score=null_score, start=0, end=0))
    return sorted(pool, key=lambda a: a.score, reverse=True)[:top_k]


# --------------------------------------------------------------------------- the pipeline
@register_task
class QuestionAnsweringPipeline(Pipeline):
    """`Pipeline.create("qa", model_dir)(question="...", context="...")`.

    Options (defaults of Hugging Face's pipeline; each may also be given per call): `top_k` 1,
    `doc_stride` min(sequence_length // 2, 128), `max_answer_length` 15, `max_question_length` 64
    (longer questions are cut to their first tokens), `handle_impossible_answer` False."""

    task = "question-answering"
    aliases = ("qa",)
    input_schema = QuestionAnsweringInput
    output_schema = QuestionAnsweringOutput

    def __init__(
        self,
        model_path,
        *,
        top_k: int = 1,
        doc_stride: int | None = None,
        max_answer_length: int = 15,
        max_question_length: int = 64,
        handle_impossible_answer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_path, **kwargs)
        self.options = self._options(
            dict(
                top_k=top_k,
                doc_stride=min(self.max_length // 2, 128) if doc_stride is None else doc_stride,
                max_answer_length=max_answer_length,
                max_question_length=max_question_length,
                handle_impossible_answer=handle_impossible_answer,
            )
        )
        self.cls_id = self._cls_id()
        self._windowing: dict[int, Tokenizer] = {}
        self._window_lock = threading.Lock()

    @staticmethod
    def _options(values: dict) -> dict:
        for name in ("top_k", "max_answer_length", "max_question_length"):
            v = values[name]
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        stride = values["doc_stride"]
        if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 0:
            raise ValueError(f"doc_stride must be a non-negative integer, got {stride!r}")
        return {**values, "handle_impossible_answer": bool(values["handle_impossible_answer"])}

    def _cls_id(self) -> int | None:
        for source in (self.special_tokens, self.tokenizer_config):
            token = source.get("cls_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        return None

    def _window_tokenizer(self, doc_stride: int) -> Tokenizer:
        """A copy of the tokenizer that cuts the context into windows of the largest bucket."""
        with self._window_lock:
            tok = self._windowing.get(doc_stride)
            if tok is None:
                tok = Tokenizer.from_str(self.tokenizer.to_str())
                tok.no_padding()
                tok.enable_truncation(self.max_length, stride=doc_stride, strategy="only_second", direction="right")
                self._windowing[doc_stride] = tok
        return tok

    def call_options(self, inputs: QuestionAnsweringInput) -> dict:
        """The pipeline's options with the call's overrides."""
        return self._options({k: (getattr(inputs, k) if getattr(inputs, k) is not None else v) for k, v in self.options.items()})

    def _fit_question(self, question: str, opts: dict) -> str:
        """The question cut to max_question_length tokens; checks that the stride leaves the windows
        room to move forward (the tokenizer would abort the process otherwise)."""
        encoding = self.tokenizer.encode(question, add_special_tokens=False)
        if len(encoding.ids) > opts["max_question_length"]:
            question = question[: encoding.offsets[opts["max_question_length"] - 1][1]]
        room = context_room(self.tokenizer, question, self.max_length)
        if opts["doc_stride"] >= room:
            n_question = self.max_length - room - self.tokenizer.num_special_tokens_to_add(True)
            raise ValueError(
                f"doc_stride={opts['doc_stride']} must be less than the {max(room, 0)} context tokens a window of "
                f"sequence_length={self.max_length} holds beside the question's {n_question} tokens and the special tokens; "
                "use a smaller doc_stride or max_question_length, or a larger sequence_length"
            )
        return question

    def tokenize(self, inputs: QuestionAnsweringInput) -> tuple[dict[str, np.ndarray], Any]:
        opts = self.call_options(inputs)
        pairs = [(self._fit_question(q, opts), c) for q, c in inputs.pairs()]
        per_example = encode_windows(self._window_tokenizer(opts["doc_stride"]), pairs)
        windows = [window_features(i, e, self.cls_id) for i, encodings in enumerate(per_example) for e in encodings]
        return self.feeds_from_encodings([w.encoding for w in windows]), (windows, opts)

    def postprocess(
        self, outputs: dict[str, np.ndarray], context: Any, inputs: QuestionAnsweringInput
    ) -> QuestionAnsweringOutput | list[QuestionAnsweringOutput] | list[QuestionAnsweringOutput | list[QuestionAnsweringOutput]]:
        """Per question: its best answer, or its top_k answers; a list of those for batched questions."""
        windows, opts = context
        start_logits, end_logits = self._logits(outputs)
        contexts = [c for _, c in inputs.pairs()]
        answers: list[list[QuestionAnsweringOutput]] = [[] for _ in contexts]
        nulls = [np.inf] * len(contexts)
        # More spans than top_k per window: spans inside one word widen to the same answer and merge.
        per_window = 2 * opts["top_k"] + 10
        for row, w in enumerate(windows):
            n = w.p_mask.size
            starts, ends, scores, null = span_scores(
                start_logits[row, :n],
                end_logits[row, :n],
                w.p_mask,
                opts["max_answer_length"],
                per_window,
                opts["handle_impossible_answer"],
            )
            if null is not None:
                nulls[w.example] = min(nulls[w.example], null)
            text = contexts[w.example]
            for s, e, score in zip(starts, ends, scores):
                a, b = token_span_to_chars(w.offsets, w.word_ids, w.sequence_ids, int(s), int(e))
                merge_answer(answers[w.example], QuestionAnsweringOutput(answer=text[a:b], score=float(score), start=a, end=b))
        results = []
        for found, null in zip(answers, nulls):
            best = best_answers(found, opts["top_k"], null if opts["handle_impossible_answer"] else None)
            if opts["top_k"] == 1:
                best = best[0] if best else QuestionAnsweringOutput(answer="", score=0.0, start=0, end=0)
            results.append(best)
        return results if isinstance(inputs.question, list) else results[0]

    def _logits(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if "start_logits" in outputs and "end_logits" in outputs:
            return outputs["start_logits"], outputs["end_logits"]
        values = list(outputs.values())
        if len(values) != 2 or any(v.ndim != 2 for v in values):
            raise ValueError(
                f"a question-answering model gives start_logits and end_logits of shape [batch, sequence]; this one gives "
                f"{ {k: list(v.shape) for k, v in outputs.items()} }"
            )
        return values[0], values[1]
