"""Hugging Face reference outputs for token classification on the fixture models.

`record(models_dir)` runs `transformers.pipeline("token-classification")` on the bert, distilbert
and roberta token-classification fixtures (rebuilt from their `model.safetensors`) for every text
in `TEXTS` under every aggregation strategy, plus a few cases with other `ignore_labels`, batched
inputs and a text longer than the 128-token limit, and returns the outputs with the exact call
arguments. The fixture vocabularies are tiny (384 entries), so most words split into several
sub-words, which is what the word-level strategies need to be tested on.
"""

from __future__ import annotations

from pathlib import Path

from .common import ARCHS, load_pipeline, model_dir

HEAD = "token-classification"
CALL = "transformers.pipeline('token-classification', model=dir, tokenizer=dir, framework='pt')(inputs, **kwargs)"
STRATEGIES = ("none", "simple", "first", "average", "max")

TEXTS = {
    "people": "Maria Lopez opened a small café on Hanover Street; her brother Daniel handles the accounts.",
    "accents": "Professor Hélène Fischer travelled from Zürich to São Paulo, which was naïve of her.",
    "long_words": "Astronomers described the extraordinarily unprecedented, uncompetitive internationalisation.",
    "punctuation": "Jean-Baptiste (of the U.S. Navy) said: the city's markets aren't closing -- ever!",
    "outside_vocab": "Kenji  Watanabe met 東京 officials 🙂 and paid €40\tin Hilo.",
}
# About 190 sub-word tokens for the WordPiece fixtures: the pipeline truncates at model_max_length = 128.
LONG = " ".join(
    [
        "The football club Northbridge United won the championship after a dramatic final match.",
        "Their captain, Samuel Okafor, scored twice in the last ten minutes.",
        "Fans celebrated in the streets of Manchester until the early hours of the morning.",
        "The manager praised the resilience of a squad that had been written off in October.",
        "Economists at the Central Bank warned that interest rates might rise again in the autumn.",
    ]
)


def cases() -> list[dict]:
    """Every call made on each model: a name, the input(s) and the keyword arguments."""
    out = [
        {"name": f"{text}/{strategy}", "inputs": TEXTS[text], "kwargs": {"aggregation_strategy": strategy}}
        for text in TEXTS
        for strategy in STRATEGIES
    ]
    out += [
        # "O" kept: shows how the O runs between entities are grouped.
        {"name": "people/simple/keep_O", "inputs": TEXTS["people"], "kwargs": {"aggregation_strategy": "simple", "ignore_labels": []}},
        {"name": "people/none/keep_O", "inputs": TEXTS["people"], "kwargs": {"aggregation_strategy": "none", "ignore_labels": []}},
        {
            "name": "accents/average/ignore_O_PER",
            "inputs": TEXTS["accents"],
            "kwargs": {"aggregation_strategy": "average", "ignore_labels": ["O", "PER"]},
        },
        {"name": "batch/first", "inputs": [TEXTS["people"], TEXTS["accents"]], "kwargs": {"aggregation_strategy": "first"}},
        {"name": "long/simple", "inputs": LONG, "kwargs": {"aggregation_strategy": "simple"}},
        {"name": "long/none", "inputs": LONG, "kwargs": {"aggregation_strategy": "none"}},
    ]
    return out


def _plain(result):
    """Pipeline output as JSON-ready values (numpy scalars become Python numbers)."""
    if isinstance(result, list):
        return [_plain(r) for r in result]
    return {k: (float(v) if k == "score" else int(v) if k in ("start", "end", "index") else v) for k, v in result.items()}


def record(models_dir: str | Path) -> dict:
    """Run every case on every architecture; returns {"models": {arch: {"model_dir", "cases"}}}."""
    import torch

    out: dict = {"task": HEAD, "pipeline": CALL, "models": {}}
    for arch in ARCHS:
        directory = model_dir(Path(models_dir), arch, HEAD)
        ner = load_pipeline(HEAD, directory)
        recorded = []
        for case in cases():
            with torch.inference_mode():
                result = ner(case["inputs"], **case["kwargs"])
            recorded.append({**case, "output": _plain(result)})
        out["models"][arch] = {"model_dir": directory.name, "cases": recorded}
    return out
