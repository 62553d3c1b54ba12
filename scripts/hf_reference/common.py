"""Shared pieces of the Hugging Face reference recorders: inputs, model loading, JSON conversion.

Imported only by the recorders (which need torch and transformers < 5); never by the test suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ARCHS = ("bert", "distilbert", "roberta")

# Texts with accented words (café, Zürich, naïve, São Paulo), long words the tiny vocabularies split
# into several sub-words, punctuation, characters outside the vocabularies and irregular spacing.
TEXTS = (
    "Maria Lopez opened a small café on Hanover Street in the spring of last year.",
    "Zürich is known for its banks, its lake, and its surprisingly lively music scene.",
    "It would be naïve to think that a single policy could solve the housing crisis.",
    "Electroencephalography measures the electrical activity of the brain through the scalp.",
    "Astronomers described the discovery as genuinely unprecedented!",
    "São Paulo traffic can be extraordinary, so executives commute by helicopter.",
    "The   quick\tbrown fox (東京 🙂) jumped — twice.",
    "Good.",
    "terrible",
    "Fans celebrated in the streets of Manchester until the early hours of the morning.",
)

# Sentence pairs (text, text_pair).
PAIRS = (
    ("Who runs the café?", "Maria Lopez opened a small café in São Paulo; it is not naïve to expect queues."),
    ("Is Zürich expensive?", "Zürich is known for its banks, its lake, and its surprisingly lively music scene."),
    ("What is electroencephalography?", "Electroencephalography measures the electrical activity of the brain."),
    ("The match was dramatic.", "Northbridge United won the championship after a dramatic final match."),
)

# Long enough (well over 64 sub-word tokens with every fixture tokenizer) to exercise truncation.
LONG_TEXT = (
    "São Paulo is the largest city in Brazil and one of the most populous cities in the world. Traffic in "
    "São Paulo can be extraordinary, so many executives commute by helicopter. The city also has a "
    "remarkable food culture, with restaurants from every corner of the globe. Joaquim Ribeiro, a "
    "journalist at Folha Metropolitana, wrote a long essay about the city's street markets."
)


def model_dir(models_dir: Path, arch: str, head: str) -> Path:
    """The fixture directory of `arch` with `head`, e.g. tests/fixtures/models/bert-sequence-classification."""
    path = Path(models_dir) / f"{arch}-{head}"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; regenerate the fixtures with scripts/make_fixtures.py")
    return path


def load_pipeline(task: str, directory: Path, **kwargs: Any):
    """`transformers.pipeline(task)` on a fixture directory's model.safetensors and tokenizer, on CPU in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    pipe = transformers.pipeline(task, model=str(directory), tokenizer=str(directory), framework="pt", device="cpu", **kwargs)
    pipe.model.eval()
    return pipe


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__}


def jsonable(obj: Any, digits: int | None = None) -> Any:
    """Tensors, arrays and NumPy scalars → lists and Python numbers; floats rounded to `digits`
    significant digits if given (9 keep every float32 value exactly), else kept as they are."""
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, digits) for v in obj]
    if isinstance(obj, float) and digits is not None:
        return float(f"{obj:.{digits}g}")
    return obj
