"""Task pipelines: tokenization and post-processing around the Engine.

`Pipeline.create(task, model_path, ...)` builds one; the tasks and their aliases (matched
case-insensitively, `-` and `_` alike):

- question-answering (qa)
- text-classification (sentiment-analysis, glue)
- token-classification (ner)
- embeddings (feature-extraction, sentence-embeddings)
"""

from .base import TASKS, NonEmptyStr, Pipeline, TaskRegistry, TruncationWarning, normalize_task, register_task
from .embeddings import EmbeddingsInput, EmbeddingsOutput, EmbeddingsPipeline
from .question_answering import QuestionAnsweringInput, QuestionAnsweringOutput, QuestionAnsweringPipeline
from .text_classification import TextClassificationInput, TextClassificationOutput, TextClassificationPipeline
from .token_classification import TokenClassificationInput, TokenClassificationOutput, TokenClassificationPipeline

__all__ = [
    "TASKS",
    "EmbeddingsInput",
    "EmbeddingsOutput",
    "EmbeddingsPipeline",
    "NonEmptyStr",
    "Pipeline",
    "QuestionAnsweringInput",
    "QuestionAnsweringOutput",
    "QuestionAnsweringPipeline",
    "TaskRegistry",
    "TextClassificationInput",
    "TextClassificationOutput",
    "TextClassificationPipeline",
    "TokenClassificationInput",
    "TokenClassificationOutput",
    "TokenClassificationPipeline",
    "TruncationWarning",
    "normalize_task",
    "register_task",
]
