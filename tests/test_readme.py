"""The README's quick start runs as written (from the repository root) and agrees with onnxruntime."""

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_runs(monkeypatch):
    block = re.search(r"## Quick start\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    session = ort.InferenceSession(
        str(ROOT / "tests/fixtures/models/bert-sequence-classification/model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {"input_ids": scope["ids"], "attention_mask": scope["mask"], "token_type_ids": scope["types"]}
    np.testing.assert_allclose(scope["logits"], session.run(None, feeds)[0], atol=1e-4, rtol=1e-3)
