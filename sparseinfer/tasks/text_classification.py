"""Text classification (aliases: sentiment-analysis, glue): one label distribution per text or text pair.

Scores follow the Hugging Face v4 pipeline rules (`function_to_apply`): softmax over the labels;
sigmoid per label for multi-label models (`problem_type == "multi_label_classification"`) and for
single-logit models; none for regression. `top_k=1` (the default) gives each input's best label,
`top_k=None` every label, best first. Inputs longer than the largest sequence length are truncated
to it (longest first for pairs, as Hugging Face's `truncation=True`) with a TruncationWarning;
`truncation=False` makes them an error instead.

Output, in the DeepSparse schema: `labels` and `scores` hold one entry per input in batch order
(also for a single string); an entry is a label and its score when `top_k == 1`, else lists.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import NonEmptyStr, Pipeline, register_task

__all__ = ["TextClassificationInput", "TextClassificationOutput", "TextClassificationPipeline", "class_scores", "top_labels"]

FUNCTIONS = ("softmax", "sigmoid", "none")

# One input given as a list: [text] or [text, text_pair].
TextList = Annotated[list[NonEmptyStr], Field(min_length=1, max_length=2)]


class TextClassificationInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: NonEmptyStr | Annotated[list[NonEmptyStr | TextList], Field(min_length=1)] = Field(
        description="A text, a list of texts, or a list of [text] / [text, text_pair] lists (sentence pairs), in batch order"
    )


class TextClassificationOutput(BaseModel):
    labels: list[str | list[str]] = Field(description="Per input in batch order: the best label, or the top_k labels best first")
    scores: list[float | list[float]] = Field(description="The probabilities of those labels")


def choose_function(config: dict, function_to_apply: str | None = None) -> str:
    """The score function Hugging Face's text-classification pipeline applies by default."""
    if function_to_apply is not None:
        name = str(function_to_apply).lower()
        if name not in FUNCTIONS:
            raise ValueError(f"function_to_apply must be one of {FUNCTIONS} or None, got {function_to_apply!r}")
        return name
    problem = config.get("problem_type")
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def class_scores(logits: np.ndarray, function: str) -> np.ndarray:
    """[rows, labels] logits → scores, computed in float64."""
    x = np.asarray(logits, np.float64)
    if function == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if function == "none":
        return x
    raise ValueError(f"unknown score function {function!r}; one of {FUNCTIONS}")


def top_labels(scores: np.ndarray, id2label: dict[int, str], top_k: int | None) -> tuple[list, list]:
    """Per row: (label, score) when top_k == 1, else (labels, scores) of the top_k (all if None), best first."""
    labels: list = []
    values: list = []
    for row in np.asarray(scores):
        order = np.argsort(-row, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        names = [id2label.get(int(i), f"LABEL_{int(i)}") for i in order]
        if top_k == 1:
            labels.append(names[0])
            values.append(float(row[order[0]]))
        else:
            labels.append(names)
            values.append([float(row[i]) for i in order])
    return labels, values


@register_task
class TextClassificationPipeline(Pipeline):
    """`Pipeline.create("text-classification", model_dir, top_k=1)("a text")`."""

    task = "text-classification"
    aliases = ("sentiment-analysis", "glue")
    input_schema = TextClassificationInput
    output_schema = TextClassificationOutput

    def __init__(
        self,
        model_path,
        *,
        top_k: int | None = 1,
        function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None,
        truncation: bool = True,
        **kwargs: Any,
    ) -> None:
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer (1: the best label) or None (all labels), got {top_k!r}")
        super().__init__(model_path, **kwargs)
        self.top_k = None if top_k is None else int(top_k)
        self.function = choose_function(self.config, function_to_apply)
        self.truncation = bool(truncation)
        if not self.id2label:
            raise ValueError(f"{str(self.model_dir / 'config.json')!r} has no id2label: a text-classification model needs its label names")

    def tokenize(self, inputs: TextClassificationInput) -> tuple[dict[str, np.ndarray], Any]:
        seqs = inputs.sequences
        items = [seqs] if isinstance(seqs, str) else [s if isinstance(s, str) else (s[0] if len(s) == 1 else tuple(s)) for s in seqs]
        encodings, truncated = self.encode_fitting(items, truncation=self.truncation)
        return self.feeds_from_encodings(encodings), truncated

    def postprocess(self, outputs: dict[str, np.ndarray], context: Any, inputs: TextClassificationInput) -> TextClassificationOutput:
        logits = outputs.get("logits", next(iter(outputs.values())))
        if logits.ndim != 2 or logits.shape[1] != len(self.id2label):
            raise ValueError(
                f"the model's output has shape {list(logits.shape)}, but config.json names {len(self.id2label)} labels: "
                "is this a sequence-classification model?"
            )
        labels, scores = top_labels(class_scores(logits, self.function), self.id2label, self.top_k)
        return TextClassificationOutput(labels=labels, scores=scores)
