"""Hugging Face reference outputs for embeddings on the fixture models.

There is no sentence-transformers model among the fixtures, and sentence-transformers is not a
dependency: `record(models_dir)` runs `transformers.pipeline("feature-extraction")` on the bert,
distilbert and roberta sequence-classification fixtures (AutoModel loads the base encoder of those
checkpoints, so the result is the encoder's last hidden state, the value the sparseinfer pipeline
cuts the ONNX graph at) and pools it here with the definitions of sentence-transformers' `Pooling`
module (mask = attention mask, all ones for an unpadded single text):

- mean: sum(h · mask) / clamp(sum(mask), min=1e-9)
- cls: h[:, 0]
- max: h with padding positions set to -1e9, max over tokens
- mean_sqrt_len: sum(h · mask) / sqrt(clamp(sum(mask), min=1e-9))

and `torch.nn.functional.normalize` (p=2, eps=1e-12) for the sentence-transformers `Normalize`
module. Cases: every text alone, and a long text with the tokenizer arguments
`truncation=True, max_length=32`.
"""

from __future__ import annotations

from pathlib import Path

from .common import ARCHS, LONG_TEXT, TEXTS, jsonable, load_pipeline, model_dir

HEAD = "sequence-classification"
CALL = "transformers.pipeline('feature-extraction', model=dir, tokenizer=dir, framework='pt')(text, return_tensors=True, **kwargs)"
MODES = ("mean", "cls", "max", "mean_sqrt_len")

CASES: list[dict] = [
    *({"name": f"text_{i}", "inputs": text, "kwargs": {}} for i, text in enumerate(TEXTS)),
    {"name": "truncated_32", "inputs": LONG_TEXT, "kwargs": {"tokenize_kwargs": {"truncation": True, "max_length": 32}}},
]


def pool(hidden, mask, mode: str):
    """sentence-transformers' Pooling on [batch, tokens, hidden] states."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    total = (hidden * m).sum(dim=1)
    count = torch.clamp(m.sum(dim=1), min=1e-9)
    return total / count if mode == "mean" else total / torch.sqrt(count)


def record(models_dir: str | Path) -> dict:
    """Run every case on every architecture; returns {"models": {arch: {"model_dir", "cases"}}}."""
    import torch

    out: dict = {
        "task": "embeddings",
        "pipeline": CALL,
        "pooling": "sentence-transformers Pooling definitions, see scripts/hf_reference/embeddings.py",
        "models": {},
    }
    for arch in ARCHS:
        directory = model_dir(Path(models_dir), arch, HEAD)
        pipe = load_pipeline("feature-extraction", directory)
        cases = []
        for case in CASES:
            with torch.inference_mode():
                hidden = pipe(case["inputs"], return_tensors=True, **case["kwargs"]).double()  # [1, tokens, hidden]
            assert hidden.ndim == 3 and hidden.shape[0] == 1, hidden.shape
            mask = torch.ones(hidden.shape[:2], dtype=torch.float64)
            pooled = {mode: pool(hidden, mask, mode)[0] for mode in MODES}
            for mode in MODES:
                pooled[f"{mode}_normalized"] = torch.nn.functional.normalize(pooled[mode], p=2, dim=-1, eps=1e-12)
            cases.append({**case, "tokens": int(hidden.shape[1]), "output": jsonable(pooled, digits=9)})
        out["models"][arch] = {"model_dir": directory.name, "cases": cases}
    return out
