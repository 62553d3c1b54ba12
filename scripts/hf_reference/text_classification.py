"""Hugging Face reference outputs for text classification on the fixture models.

`record(models_dir)` runs `transformers.pipeline("text-classification")` on the bert, distilbert and
roberta sequence-classification fixtures (from their `model.safetensors`) for every case in `CASES`
and returns the outputs with the exact call arguments. Cases: each text alone with the default
arguments (the legacy single-dict result), with `top_k=1`, `top_k=2` and `top_k=None`; the texts as
one batch; sentence pairs (as `{"text", "text_pair"}` dicts, the v4 way to pass pairs); sigmoid
scores (`function_to_apply="sigmoid"`, what a multi-label config selects); and a long text
truncated with `truncation=True, max_length=32` (tokenizer arguments, longest first).
"""

from __future__ import annotations

from pathlib import Path

from .common import ARCHS, LONG_TEXT, PAIRS, TEXTS, jsonable, load_pipeline, model_dir

HEAD = "sequence-classification"
CALL = "transformers.pipeline('text-classification', model=dir, tokenizer=dir, framework='pt')(inputs, **kwargs)"

CASES: list[dict] = [
    *({"name": f"default_{i}", "inputs": text, "kwargs": {}} for i, text in enumerate(TEXTS)),
    *({"name": f"top1_{i}", "inputs": text, "kwargs": {"top_k": 1}} for i, text in enumerate(TEXTS)),
    *({"name": f"all_{i}", "inputs": text, "kwargs": {"top_k": None}} for i, text in enumerate(TEXTS)),
    {"name": "top2_batch", "inputs": list(TEXTS[:4]), "kwargs": {"top_k": 2}},
    {"name": "batch", "inputs": list(TEXTS), "kwargs": {"top_k": 1}},
    {"name": "pairs", "inputs": [{"text": a, "text_pair": b} for a, b in PAIRS], "kwargs": {"top_k": None}},
    {"name": "sigmoid", "inputs": list(TEXTS[:5]), "kwargs": {"top_k": None, "function_to_apply": "sigmoid"}},
    {"name": "truncated_32", "inputs": LONG_TEXT, "kwargs": {"top_k": None, "truncation": True, "max_length": 32}},
    {
        "name": "pairs_truncated_32",
        "inputs": [{"text": a, "text_pair": LONG_TEXT} for a, _ in PAIRS[:2]],
        "kwargs": {"top_k": None, "truncation": True, "max_length": 32},
    },
]


def record(models_dir: str | Path) -> dict:
    """Run every case on every architecture; returns {"models": {arch: {"model_dir", "cases"}}}."""
    import torch

    out: dict = {"task": "text-classification", "pipeline": CALL, "models": {}}
    for arch in ARCHS:
        directory = model_dir(Path(models_dir), arch, HEAD)
        pipe = load_pipeline("text-classification", directory)
        cases = []
        for case in CASES:
            with torch.inference_mode():
                result = pipe(case["inputs"], **case["kwargs"])
            cases.append({**case, "output": jsonable(result)})
        out["models"][arch] = {"model_dir": directory.name, "cases": cases}
    return out
