"""`make demo`: run an exported fixture model through the Engine and print a short report.

The models under tests/fixtures are tiny and random-weight: the labels they predict mean nothing;
the demo shows the path text → tokens → Engine → probabilities, and where the time goes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import Engine, __version__

MODELS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"
SENTENCES = [
    "The café in Zürich opened early this morning.",
    "Researchers published the results after a long review.",
    "Nobody expected the river to flood the old town.",
]


def main() -> int:
    model_dir = MODELS / "bert-sequence-classification"
    if not model_dir.is_dir():
        print(f"demo model not found at {model_dir}; run `make demo` from a clone of the repository", file=sys.stderr)
        return 1
    config = json.loads((model_dir / "config.json").read_text())
    labels = config["id2label"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=config.get("pad_token_id", 0))
    enc = tok.encode_batch(SENTENCES)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }

    t0 = time.perf_counter()
    engine = Engine(model_dir)
    t1 = time.perf_counter()
    (logits,) = engine.run(feeds)
    t2 = time.perf_counter()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    g = engine.graph
    print(f"sparseinfer {__version__} — demo on {model_dir.relative_to(MODELS.parents[2])}")
    print(f"  graph: {len(g)} nodes, opset {g.opset}, {len(g.op_counts())} op types; inputs {engine.input_names}")
    batch, seq = feeds["input_ids"].shape
    print(f"  load + import: {1e3 * (t1 - t0):.1f} ms; first run (batch {batch}, seq {seq}): {1e3 * (t2 - t1):.1f} ms")
    print("  (random-weight fixture model: the labels are not meaningful)")
    for text, p in zip(SENTENCES, probs):
        best = int(p.argmax())
        print(f"  {labels[str(best)]:>9s} {p[best]:.3f}  {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
