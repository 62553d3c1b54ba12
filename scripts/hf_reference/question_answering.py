"""Hugging Face reference outputs for extractive question answering on the fixture models.

`record(models_dir)` runs `transformers.pipeline("question-answering")` on the bert, distilbert
and roberta question-answering fixtures (rebuilt from their `model.safetensors`) for every case in
`CASES` and returns the outputs with the exact call arguments. Cases cover the default settings,
contexts long enough to need several windows (`max_seq_len` 64 with `doc_stride` 32, and the
default 128 / 64), `top_k` 1 and 3, a short `max_answer_len`, `handle_impossible_answer` (with
the empty answer winning, placed and absent), a one-word context with fewer answers than `top_k`,
irregular whitespace, accented and non-Latin text and batched inputs.
"""

from __future__ import annotations

from pathlib import Path

from .common import ARCHS, load_pipeline, model_dir

HEAD = "question-answering"
CALL = "transformers.pipeline('question-answering', model=dir, tokenizer=dir, framework='pt')(question=..., context=..., **kwargs)"

CAFE = (
    "Maria Lopez opened a small café on Hanover Street in the spring of last year. The café serves strong "
    "coffee, fresh bread, and a lemon cake that regulars describe as unforgettable. Her brother Daniel "
    "handles the accounts, while her cousin Ana bakes every morning before sunrise."
)
ZURICH = (
    "Zürich is known for its banks, its lake, and its surprisingly lively music scene. A delegation from "
    "the University of Geneva travelled to Zürich to discuss climate research. Professor Hélène Fischer "
    "presented new measurements of glacier retreat in the Alps."
)
# Long enough (about 150 to 250 sub-word tokens, depending on the tokenizer) to need several windows.
LONG = (
    "São Paulo is the largest city in Brazil and one of the most populous cities in the world. Traffic in "
    "São Paulo can be extraordinary, so many executives commute by helicopter. The city also has a "
    "remarkable food culture, with restaurants from every corner of the globe. Joaquim Ribeiro, a "
    "journalist at Folha Metropolitana, wrote a long essay about the city's street markets. He argued "
    "that the markets are the true heart of the neighbourhood. It would be naïve to think that a single "
    "policy could solve the housing crisis. Economists at the Central Bank warned that interest rates "
    "might rise again in the autumn. The finance minister, Sofia Andersson, disagreed and promised to "
    "keep borrowing costs stable."
)
# Irregular whitespace, a repeated word in two cases (answers are merged case-insensitively) and
# characters outside the tiny vocabularies.
ODD = "  The  telescope on Mauna Kea — Mauna kea! —  captured\nan image of a galaxy (東京 🙂) billions of light years away."

CASES: list[dict] = [
    {"name": "default", "inputs": {"question": "Who opened the café?", "context": CAFE}, "kwargs": {}},
    {"name": "unicode", "inputs": {"question": "Where did the delegation travel?", "context": ZURICH}, "kwargs": {}},
    {"name": "odd_text", "inputs": {"question": "What did the telescope capture?", "context": ODD}, "kwargs": {"top_k": 3}},
    {"name": "long_default_windows", "inputs": {"question": "Who wrote the essay?", "context": LONG}, "kwargs": {}},
    {
        "name": "long_small_windows",
        "inputs": {"question": "Who wrote the essay?", "context": LONG},
        "kwargs": {"max_seq_len": 64, "doc_stride": 32},
    },
    {
        "name": "long_small_windows_top3",
        "inputs": {"question": "What did the economists warn about?", "context": LONG},
        "kwargs": {"max_seq_len": 64, "doc_stride": 32, "top_k": 3},
    },
    {
        "name": "short_answers_top3",
        "inputs": {"question": "What does the café serve?", "context": CAFE},
        "kwargs": {"max_answer_len": 2, "top_k": 3},
    },
    {
        "name": "impossible",
        "inputs": {"question": "What is the capital of Peru?", "context": ZURICH},
        "kwargs": {"handle_impossible_answer": True},
    },
    {
        "name": "impossible_windows_top3",
        "inputs": {"question": "Who is the mayor?", "context": LONG},
        "kwargs": {"handle_impossible_answer": True, "top_k": 3, "max_seq_len": 64, "doc_stride": 24},
    },
    {
        "name": "impossible_wins",
        "inputs": {"question": "Is it raining?", "context": "The end."},
        "kwargs": {"handle_impossible_answer": True},
    },
    {
        "name": "impossible_top3",
        "inputs": {"question": "When did it happen?", "context": "Perhaps."},
        "kwargs": {"handle_impossible_answer": True, "top_k": 3},
    },
    # Fewer distinct answers than top_k: the pipeline pads its list with zero-score spans it
    # considers impossible (reversed, or through the [CLS] token).
    {"name": "tiny_context_top3", "inputs": {"question": "Where?", "context": "Hilo"}, "kwargs": {"top_k": 3}},
    {
        "name": "batch",
        "inputs": {"question": ["Who bakes every morning?", "Who presented measurements?"], "context": [CAFE, ZURICH]},
        "kwargs": {},
    },
    {
        "name": "batch_one_context_top3",
        "inputs": {"question": ["Who handles the accounts?", "What is unforgettable?"], "context": CAFE},
        "kwargs": {"top_k": 3, "max_answer_len": 4},
    },
]


def _plain(result):
    """Pipeline output as JSON-ready values (scores become Python floats)."""
    if isinstance(result, list):
        return [_plain(r) for r in result]
    return {"score": float(result["score"]), "start": int(result["start"]), "end": int(result["end"]), "answer": result["answer"]}


def _null_score(qa, case: dict) -> float:
    """The score the pipeline gives the empty answer: min over windows of p_start[CLS] * p_end[CLS]."""
    from transformers.pipelines.question_answering import select_starts_ends

    kw = case["kwargs"]
    pre = {"max_seq_len": kw.get("max_seq_len"), "doc_stride": kw.get("doc_stride")}
    null = 1000000.0
    for item in qa.preprocess(dict(case["inputs"]), **pre):
        out = qa.forward(item)
        mask = out["attention_mask"].numpy()
        _, _, _, null = select_starts_ends(out["start"], out["end"], out["p_mask"], mask, null, 1, True, 15)
    return float(null)


def _effective(kwargs: dict, model_max_length: int) -> dict:
    """The window settings the pipeline used: max_seq_len defaults to min(model_max_length, 384)
    (128 for the fixtures), doc_stride to min(max_seq_len // 2, 128)."""
    max_seq_len = kwargs.get("max_seq_len", min(model_max_length, 384))
    return {"max_seq_len": max_seq_len, "doc_stride": kwargs.get("doc_stride", min(max_seq_len // 2, 128))}


def record(models_dir: str | Path) -> dict:
    """Run every case on every architecture; returns {"models": {arch: {"model_dir", "cases"}}}.

    A case records the call (`inputs`, `kwargs`), the window settings in effect (`effective`), the
    pipeline's `output` and, for single questions with `handle_impossible_answer`, the empty
    answer's score (`null_score`) even when it is not among the answers returned."""
    import torch

    out: dict = {"task": HEAD, "pipeline": CALL, "models": {}}
    for arch in ARCHS:
        directory = model_dir(Path(models_dir), arch, HEAD)
        qa = load_pipeline(HEAD, directory)
        cases = []
        for case in CASES:
            with torch.inference_mode():
                result = qa(**case["inputs"], **case["kwargs"])
            entry = {**case, "effective": _effective(case["kwargs"], qa.tokenizer.model_max_length), "output": _plain(result)}
            if case["kwargs"].get("handle_impossible_answer") and isinstance(case["inputs"]["question"], str):
                with torch.inference_mode():
                    entry["null_score"] = _null_score(qa, case)
            cases.append(entry)
        out["models"][arch] = {"model_dir": directory.name, "cases": cases}
    return out
