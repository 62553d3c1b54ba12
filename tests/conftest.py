"""Shared fixtures: the exported model fixtures (see scripts/make_fixtures.py) and input makers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sparseinfer  # noqa: F401  before any test module imports numba: it sets numba's compile target

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["models"]


def model_ids() -> list[str]:
    return [m["path"] for m in MANIFEST]


def manifest_entry(path: str) -> dict:
    return next(m for m in MANIFEST if m["path"] == path)


def make_inputs(entry: dict, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with right-padding in the attention mask (row i padded more than row i-1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 380, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    for i in range(1, batch):
        mask[i, max(1, seq - (i * seq) // (batch + 1)) :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in entry["inputs"]:
        types = np.zeros((batch, seq), np.int64)
        types[:, seq // 2 :] = 1
        feeds["token_type_ids"] = types
    return feeds


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
