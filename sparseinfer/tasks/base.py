"""Pipeline: the task layer's base class, its registry, and the stages every task shares.

A pipeline call is four timed stages::

    parse (input schema) → tokenize (engine feeds + context) → engine → postprocess (output schema)

`Pipeline.create(task, model_path, ...)` looks the task up in the registry (names and aliases match
case-insensitively, with `-` and `_` equivalent) and builds the task's pipeline.

Sequence-length buckets: `sequence_length` may be a list; the Engine leaves the sequence dim open
and caches one compiled plan per length (the plans share the weights). Every chunk of `batch_size`
rows goes to the smallest bucket that holds its longest row (by its attention mask), the largest if
none does; a task decides what to do with inputs longer than the largest bucket (text
classification and embeddings truncate, with a `TruncationWarning`). The Engine's batch dim is fixed
to `batch_size`: a last, short chunk is filled up with copies of its first row, whose results are
dropped, so there is exactly one plan per bucket.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator, BaseModel
from tokenizers import Encoding, Tokenizer

from ..graph import Graph
from ..runtime import Engine

__all__ = [
    "NonEmptyStr",
    "Pipeline",
    "TaskRegistry",
    "TruncationWarning",
    "TASKS",
    "normalize_task",
    "register_task",
]

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

STAGES = ("parse", "tokenize", "engine", "postprocess")


class TruncationWarning(UserWarning):
    """An input was longer than the largest sequence length and was truncated to it."""


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be empty (or only whitespace): give the text to run the model on")
    return text


# A string input that must contain something other than whitespace; for the task input schemas.
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


# --------------------------------------------------------------------------- registry
def normalize_task(name: str) -> str:
    """The spelling task names are matched in: lower case, `_` → `-`, surrounding blanks dropped."""
    if not isinstance(name, str):
        raise TypeError(f"a task name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("_", "-")


class TaskRegistry:
    """Task name / alias → Pipeline subclass. Registering a name or alias twice is an error."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Pipeline]] = {}
        self._lock = threading.Lock()

    def register(self, cls: type[Pipeline]) -> type[Pipeline]:
        task = getattr(cls, "task", None)
        if not isinstance(task, str) or not task:
            raise TypeError(f"{cls.__name__} must set the class attribute `task` (its canonical task name) to register")
        names = [normalize_task(task), *(normalize_task(a) for a in getattr(cls, "aliases", ()))]
        if len(set(names)) != len(names):
            raise ValueError(f"{cls.__name__}: task name and aliases {names} repeat a name")
        with self._lock:
            taken = {n: self._by_name[n] for n in names if n in self._by_name and self._by_name[n] is not cls}
            if taken:
                owners = ", ".join(f"{n!r} (by {c.__module__}.{c.__qualname__})" for n, c in taken.items())
                raise ValueError(f"cannot register {cls.__module__}.{cls.__qualname__}: task name(s) already registered: {owners}")
            for n in names:
                self._by_name[n] = cls
        return cls

    def lookup(self, name: str) -> type[Pipeline]:
        cls = self._by_name.get(normalize_task(name))
        if cls is None:
            raise ValueError(f"unknown task {name!r}; the tasks are: {self.describe()}")
        return cls

    def tasks(self) -> dict[str, tuple[str, ...]]:
        """Canonical task name → its aliases."""
        out: dict[str, tuple[str, ...]] = {}
        for cls in self._by_name.values():
            out.setdefault(cls.task, tuple(cls.aliases))
        return dict(sorted(out.items()))

    def describe(self) -> str:
        parts = [f"{t} (aliases: {', '.join(a)})" if a else t for t, a in self.tasks().items()]
        return "; ".join(parts) if parts else "(none registered)"

    def __contains__(self, name: str) -> bool:
        return normalize_task(name) in self._by_name


TASKS = TaskRegistry()


def register_task(cls: type[Pipeline]) -> type[Pipeline]:
    """Class decorator: add a Pipeline subclass to the task registry under `task` and `aliases`."""
    return TASKS.register(cls)


def _load_builtin_tasks() -> None:
    import importlib

    importlib.import_module("sparseinfer.tasks")  # its __init__ imports every task module


# --------------------------------------------------------------------------- model directory
def resolve_model_path(model_path: str | os.PathLike) -> tuple[Path, Path]:
    """(the .onnx file, the directory holding tokenizer and config) for a directory or an .onnx file."""
    path = Path(model_path)
    if path.is_dir():
        model_file, model_dir = path / MODEL_FILE, path
        if not model_file.is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no {MODEL_FILE}; it holds {sorted(p.name for p in path.iterdir())}. "
                f"Pass a directory with {MODEL_FILE}, {TOKENIZER_FILE} and {CONFIG_FILE}, or the path of an .onnx file beside them"
            )
    elif path.is_file():
        if path.suffix != ".onnx":
            raise ValueError(f"model_path {str(path)!r} is neither a directory nor an .onnx file")
        model_file, model_dir = path, path.parent
    else:
        raise FileNotFoundError(
            f"model_path {str(path)!r} does not exist; pass a directory with {MODEL_FILE}, {TOKENIZER_FILE} and {CONFIG_FILE}"
        )
    for name, what in ((TOKENIZER_FILE, "the tokenizer (save it with tokenizer.save_pretrained(dir))"), (CONFIG_FILE, "the model config")):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{str(model_dir)!r} has no {name}, which holds {what}; a model directory needs {MODEL_FILE}, {TOKENIZER_FILE} and {CONFIG_FILE}"
            )
    return model_file, model_dir


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- the pipeline
class Pipeline:
    """Base class of the task pipelines. Subclasses set `task`, `aliases`, `input_schema`,
    `output_schema` and implement `tokenize` and `postprocess` (and `parse` if the default does
    not fit); they take their own options as keyword arguments and pass the rest on here."""

    task: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    input_schema: ClassVar[type[BaseModel]]
    output_schema: ClassVar[type[BaseModel]]

    def __init__(
        self,
        model_path: str | os.PathLike,
        sequence_length: int | Sequence[int] = 128,
        batch_size: int = 1,
        num_threads: int | None = None,
        quantize: str | None = None,
        **task_kwargs: Any,
    ) -> None:
        if task_kwargs:
            raise TypeError(f"unknown option(s) for the {self.task!r} pipeline: {sorted(task_kwargs)}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None (fp32) or 'int8', got {quantize!r}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if model_path is None:
            raise ValueError(self._no_model_message())
        self.quantize = quantize
        self.batch_size = int(batch_size)
        self.model_file, self.model_dir = resolve_model_path(model_path)
        self.config: dict = _read_json(self.model_dir / CONFIG_FILE)
        self.tokenizer_config: dict = self._optional_json(TOKENIZER_CONFIG_FILE)
        self.special_tokens: dict = self._optional_json(SPECIAL_TOKENS_FILE)
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}
        self.tokenizer: Tokenizer = self._load_tokenizer()
        self.pad_token_id: int = self._pad_token_id()
        self.max_model_length: int | None = self._max_model_length()
        self.sequence_lengths: list[int] = self._check_sequence_lengths(sequence_length)
        model = self.prepare_model(self.model_file)
        self.engine = Engine(model, batch_size=self.batch_size, num_threads=num_threads, quantize=quantize)
        self.timings: dict[str, float] = {}
        self._truncating: dict[int, Tokenizer] = {}
        self._tok_lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, task: str, model_path: str | os.PathLike | None = None, **kwargs: Any) -> Pipeline:
        """The pipeline for `task` (a name or alias, e.g. "sentiment-analysis", "qa", "ner")."""
        _load_builtin_tasks()
        task_cls = TASKS.lookup(task)
        if model_path is None:
            model_path = task_cls.default_model_path()
        if model_path is None:
            raise ValueError(task_cls._no_model_message())
        return task_cls(model_path, **kwargs)

    @classmethod
    def default_model_path(cls) -> Path | None:
        """The model a task uses when none is given (None: the task has no default)."""
        return None

    @classmethod
    def _no_model_message(cls) -> str:
        return (
            f"no model_path given and the {cls.task!r} task has no default model yet: pass model_path, a directory with "
            f"{MODEL_FILE} (an ONNX export, e.g. from `optimum-cli export onnx`), {TOKENIZER_FILE} and {CONFIG_FILE} "
            "(as written by save_pretrained), or the path of an .onnx file beside them"
        )

    def prepare_model(self, model_file: Path) -> str | os.PathLike | Graph:
        """What the Engine is built from: the ONNX file, or a Graph a task derived from it."""
        return model_file

    def _optional_json(self, name: str) -> dict:
        path = self.model_dir / name
        return _read_json(path) if path.is_file() else {}

    def _load_tokenizer(self) -> Tokenizer:
        path = self.model_dir / TOKENIZER_FILE
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"could not load the tokenizer from {str(path)!r}: {exc}") from None
        tok.no_padding()  # padding and truncation are the pipeline's business
        tok.no_truncation()
        return tok

    def _pad_token_id(self) -> int:
        for source in (self.special_tokens, self.tokenizer_config):
            token = _token_content(source.get("pad_token"))
            if token is not None and self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        pad = self.config.get("pad_token_id")
        return int(pad) if isinstance(pad, int) else 0

    def _max_model_length(self) -> int | None:
        """The longest sequence the model takes: the tokenizer's model_max_length, else the position
        embeddings (RoBERTa-family models offset positions by pad_token_id + 1)."""
        limit = self.tokenizer_config.get("model_max_length")
        if isinstance(limit, (int, float)) and 0 < limit < 1_000_000:
            return int(limit)
        positions = self.config.get("max_position_embeddings")
        if isinstance(positions, int):
            if self.config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
                positions -= int(self.config.get("pad_token_id", 1)) + 1
            return positions
        return None

    def _check_sequence_lengths(self, sequence_length: int | Sequence[int]) -> list[int]:
        values = [sequence_length] if isinstance(sequence_length, (int, np.integer)) else sequence_length
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise ValueError(f"sequence_length must be a positive integer or a non-empty list of them, got {sequence_length!r}")
        for v in values:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"sequence_length must be a positive integer or a non-empty list of them, got {sequence_length!r}")
        lengths = sorted({int(v) for v in values})
        if self.max_model_length is not None and lengths[-1] > self.max_model_length:
            raise ValueError(
                f"sequence_length {lengths[-1]} exceeds the {self.max_model_length} tokens this model takes "
                f"(tokenizer_config model_max_length / config max_position_embeddings); use at most {self.max_model_length}"
            )
        return lengths

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, model={str(self.model_file)!r}, "
            f"sequence_length={self.sequence_lengths}, batch_size={self.batch_size})"
        )

    # ------------------------------------------------------------------ calling
    def __call__(self, *args: Any, **kwargs: Any) -> BaseModel:
        """parse → tokenize → engine → postprocess; `self.timings` holds each stage's seconds."""
        timings: dict[str, float] = {}
        start = t0 = time.perf_counter()
        inputs = self.parse(*args, **kwargs)
        t1 = time.perf_counter()
        timings["parse"] = t1 - t0
        feeds, context = self.tokenize(inputs)
        t2 = time.perf_counter()
        timings["tokenize"] = t2 - t1
        outputs = self.run_engine(feeds)
        t3 = time.perf_counter()
        timings["engine"] = t3 - t2
        result = self.postprocess(outputs, context, inputs)
        t4 = time.perf_counter()
        timings["postprocess"] = t4 - t3
        timings["total"] = t4 - start
        self.timings = timings
        return result

    def parse(self, *args: Any, **kwargs: Any) -> BaseModel:
        """The call's arguments as an `input_schema` object: an instance of it, or its fields as
        keyword arguments, or positionally in the schema's field order (the main field first)."""
        schema = self.input_schema
        if len(args) == 1 and not kwargs and isinstance(args[0], schema):
            return args[0]
        fields = list(schema.model_fields)
        if len(args) > len(fields):
            raise TypeError(
                f"the {self.task!r} pipeline takes at most {len(fields)} positional input(s) ({', '.join(fields)}), got {len(args)}"
            )
        values = dict(zip(fields, args))
        twice = sorted(set(values) & set(kwargs))
        if twice:
            raise TypeError(f"input(s) {twice} given both positionally and by keyword")
        return schema(**values, **kwargs)

    def tokenize(self, inputs: BaseModel) -> tuple[dict[str, np.ndarray], Any]:
        """Engine feeds (rows padded to one length) and whatever `postprocess` needs."""
        raise NotImplementedError

    def postprocess(self, outputs: dict[str, np.ndarray], context: Any, inputs: BaseModel) -> BaseModel:
        """The engine outputs (by name, one row per input row) → an `output_schema` object."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tokenization helpers
    def bucket_for(self, length: int) -> int:
        """The smallest sequence-length bucket that holds `length` tokens, else the largest."""
        for bucket in self.sequence_lengths:
            if bucket >= length:
                return bucket
        return self.sequence_lengths[-1]

    @property
    def max_length(self) -> int:
        """The largest bucket: the longest input the pipeline runs without truncating."""
        return self.sequence_lengths[-1]

    def encode(self, texts: Sequence[str | tuple[str, str]], max_length: int | None = None) -> list[Encoding]:
        """Tokenize strings or (text, text_pair) pairs with special tokens, unpadded; with
        `max_length`, truncated to it the way Hugging Face's truncation=True does (longest first)."""
        batch = [tuple(t) if isinstance(t, list) else t for t in texts]
        if max_length is None:
            return self.tokenizer.encode_batch(batch)
        return self._truncating_tokenizer(max_length).encode_batch(batch)

    def _truncating_tokenizer(self, max_length: int) -> Tokenizer:
        with self._tok_lock:
            tok = self._truncating.get(max_length)
            if tok is None:
                tok = Tokenizer.from_str(self.tokenizer.to_str())
                tok.no_padding()
                tok.enable_truncation(max_length=max_length, strategy="longest_first")
                self._truncating[max_length] = tok
        return tok

    def encode_fitting(self, texts: Sequence[str | tuple[str, str]], truncation: bool = True) -> tuple[list[Encoding], list[bool]]:
        """Encode, then truncate the inputs longer than the largest bucket (with a
        TruncationWarning), or raise a ValueError for them when `truncation` is False.
        Returns the encodings and, per input, whether it was truncated."""
        encodings = self.encode(texts)
        limit = self.max_length
        long = [i for i, e in enumerate(encodings) if len(e.ids) > limit]
        if long and not truncation:
            lengths = ", ".join(f"input {i}: {len(encodings[i].ids)} tokens" for i in long[:5])
            raise ValueError(
                f"{len(long)} input(s) are longer than the largest sequence_length {limit} ({lengths}); "
                f"shorten them, create the pipeline with a larger sequence_length (at most {self.max_model_length}), or pass truncation=True"
            )
        flags = [False] * len(encodings)
        if long:
            fixed = self.encode([texts[i] for i in long], max_length=limit)
            for i, e in zip(long, fixed):
                encodings[i] = e
                flags[i] = True
            warnings.warn(
                f"{len(long)} input(s) longer than the largest sequence_length {limit} tokens were truncated to it "
                f"(inputs {long[:10]}); pass a larger sequence_length to keep them whole, or truncation=False to get an error",
                TruncationWarning,
                stacklevel=4,
            )
        return encodings, flags

    def feeds_from_encodings(self, encodings: Sequence[Encoding], length: int | None = None) -> dict[str, np.ndarray]:
        """input_ids / attention_mask / token_type_ids, right-padded with the pad id (mask 0) to
        `length` (default: the bucket of the longest encoding)."""
        longest = max((len(e.ids) for e in encodings), default=1)
        length = self.bucket_for(longest) if length is None else int(length)
        if longest > length:
            raise ValueError(f"an encoding of {longest} tokens does not fit length {length}; truncate it first")
        n = len(encodings)
        ids = np.full((n, length), self.pad_token_id, np.int64)
        mask = np.zeros((n, length), np.int64)
        types = np.zeros((n, length), np.int64)
        for row, e in enumerate(encodings):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = e.attention_mask
            types[row, :k] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    # ------------------------------------------------------------------ running
    def run_engine(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on right-padded feeds of shape [rows, L] (any rows, L ≤ the largest bucket).

        Only the inputs the model declares are passed (token_type_ids is dropped for RoBERTa /
        DistilBERT and zero-filled if a model wants it and none was given). Rows go in chunks of
        `batch_size`, each cut or padded to the bucket of its longest row; outputs come back with
        one row per input row and any sequence axis at length L."""
        names = self.engine.input_names
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        if "input_ids" not in feeds or "attention_mask" not in feeds:
            raise ValueError(f"run_engine needs input_ids and attention_mask, got {sorted(feeds)}")
        ids = feeds["input_ids"]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [rows, sequence], got {list(ids.shape)}")
        rows, length = ids.shape
        for name in names:
            if name not in feeds:
                if name == "token_type_ids":
                    feeds[name] = np.zeros_like(ids)
                else:
                    raise ValueError(f"the model takes input {name!r}, which the pipeline did not produce")
        mask = feeds["attention_mask"]
        seq_outputs = self._sequence_outputs()
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in self.engine.output_names}
        for lo in range(0, rows, self.batch_size):
            hi = min(lo + self.batch_size, rows)
            used = np.nonzero(mask[lo:hi].any(axis=0))[0]
            real = int(used[-1]) + 1 if used.size else 1
            if real > self.max_length:
                raise ValueError(
                    f"rows {lo}..{hi - 1} hold {real} tokens, more than the largest sequence_length {self.max_length}; truncate them first"
                )
            bucket = self.bucket_for(real)
            chunk = {name: self._fit(feeds[name][lo:hi], bucket, name) for name in names}
            out = self.engine.mapped_run(chunk)
            for name, value in out.items():
                value = value[: hi - lo]
                if name in seq_outputs:
                    value = _resize_axis1(value, length)
                pieces[name].append(value)
        if rows == 0:
            raise ValueError("no inputs to run")
        return {name: np.concatenate(parts, axis=0) for name, parts in pieces.items()}

    def _fit(self, array: np.ndarray, bucket: int, name: str) -> np.ndarray:
        """One chunk of a feed at [batch_size, bucket]: cut or padded along the sequence, extra rows
        copied from the first row (their outputs are dropped)."""
        fill = self.pad_token_id if name == "input_ids" else 0
        n, length = array.shape
        out = np.full((self.batch_size, bucket), fill, array.dtype)
        k = min(length, bucket)
        out[:n, :k] = array[:, :k]
        out[n:] = out[0]
        return out

    def _sequence_outputs(self) -> set[str]:
        """Outputs whose dim 1 is the inputs' sequence dim (e.g. token logits, hidden states)."""
        graph = self.engine.graph
        seq_dims = {graph.info(n).shape[1] for n in graph.inputs if graph.info(n).shape is not None and len(graph.info(n).shape) > 1}
        seq_dims = {d for d in seq_dims if isinstance(d, str)}
        out = set()
        for name in graph.outputs:
            shape = graph.info(name).shape
            if shape is not None and len(shape) > 1 and shape[1] in seq_dims:
                out.add(name)
        return out

    def warmup(self) -> None:
        """Compile the plan of every bucket now rather than on first use."""
        for bucket in self.sequence_lengths:
            ids = np.full((self.batch_size, bucket), self.pad_token_id, np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            self.engine.plan({n: feeds[n] for n in self.engine.input_names})


def _resize_axis1(value: np.ndarray, length: int) -> np.ndarray:
    if value.shape[1] == length:
        return value
    if value.shape[1] > length:
        return value[:, :length]
    pad = [(0, 0)] * value.ndim
    pad[1] = (0, length - value.shape[1])
    return np.pad(value, pad)
