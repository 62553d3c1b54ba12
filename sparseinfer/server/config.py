"""Server configuration: which pipelines to serve, where, and with how many cores.

The YAML layout is DeepSparse's (`deepsparse.server --config_file`)::

    num_cores: 1          # Numba threads per pipeline call (default: all cores)
    num_workers: 2        # pipeline calls running at once across endpoints (default: cores // num_cores)
    endpoints:
      - task: question-answering          # a task name or alias: qa, sentiment-analysis, ner, ...
        model: ./models/bert-qa           # a directory with model.onnx, tokenizer.json, config.json (or the .onnx file)
        name: qa                          # default: <task>-<index>; served at /v2/models/<name>/infer
        route: /qa/predict                # optional extra route
        batch_size: 1
        bucketing:
          sequence_lengths: [64, 128]     # or input_shapes: [[1, 64], [1, 128]]
        kwargs: {doc_stride: 32}          # passed on to Pipeline.create

Relative model paths are resolved against the current directory, as DeepSparse does. DeepSparse keys
that have no meaning here (`loggers`, `system_logging`, `engine_thread_pinning`, `pytorch_num_threads`,
`integration: local`, `data_logging`) are accepted and ignored with a warning; any other unknown key
is an error, so a misspelt option does not go unnoticed.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "RESERVED_ROUTES",
    "ConfigError",
    "EndpointConfig",
    "ServerConfig",
    "available_cores",
    "load_config",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5543

# Paths the server itself serves; an endpoint `route` may not take one of these (nor anything under /v2/).
RESERVED_ROUTES = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

# DeepSparse server keys that configure things sparseinfer does not have; accepted so that a
# DeepSparse config file loads, and ignored (with a warning).
IGNORED_SERVER_KEYS = ("loggers", "system_logging", "engine_thread_pinning", "pytorch_num_threads")
IGNORED_ENDPOINT_KEYS = ("data_logging", "logging_config")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ROUTE = re.compile(r"^(/[A-Za-z0-9_.\-~]+)+$")


class ConfigError(ValueError):
    """A server configuration is invalid; the message says where and why."""


class ConfigWarning(UserWarning):
    """A configuration key is accepted for DeepSparse compatibility but has no effect."""


def available_cores() -> int:
    """The most threads a pipeline may use: the threads Numba was started with."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _tasks():
    from ..tasks.base import TASKS, _load_builtin_tasks

    _load_builtin_tasks()
    return TASKS


def _ignore(data: Any, keys: tuple[str, ...], where: str) -> Any:
    if isinstance(data, dict):
        dropped = [k for k in keys if k in data]
        if dropped:
            data = {k: v for k, v in data.items() if k not in dropped}
            warnings.warn(
                f"{where}: {', '.join(dropped)} {'has' if len(dropped) == 1 else 'have'} no effect in sparseinfer and "
                f"{'is' if len(dropped) == 1 else 'are'} ignored",
                ConfigWarning,
                stacklevel=2,
            )
    return data


# --------------------------------------------------------------------------- bucketing
class SequenceLengthsConfig(BaseModel):
    """`bucketing: {sequence_lengths: [64, 128]}`: one compiled plan per length."""

    model_config = ConfigDict(extra="forbid")

    sequence_lengths: list[int] = Field(min_length=1, description="The sequence lengths to compile the model for")

    @field_validator("sequence_lengths")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"sequence lengths must be positive integers, got {values}")
        return values


class InputShapesConfig(BaseModel):
    """`bucketing: {input_shapes: [[1, 64], [1, 128]]}`: [batch, sequence] shapes (or [sequence]);
    their sequence lengths become the buckets."""

    model_config = ConfigDict(extra="forbid")

    input_shapes: list[list[int]] = Field(min_length=1, description="[batch, sequence] shapes, or [sequence] lengths")

    @field_validator("input_shapes")
    @classmethod
    def _shapes(cls, shapes: list[list[int]]) -> list[list[int]]:
        for shape in shapes:
            if len(shape) not in (1, 2) or any(d < 1 for d in shape):
                raise ValueError(f"each input shape must be [batch, sequence] or [sequence] with positive sizes, got {shape}")
        return shapes


# Which of the two forms a `bucketing` mapping is: by its key, so that an error names the form's
# problem rather than both forms' (the tags are left out of error locations).
_BUCKETING_TAGS = ("by-sequence-lengths", "by-input-shapes")


def _bucketing_kind(value: Any) -> str | None:
    if isinstance(value, SequenceLengthsConfig):
        return _BUCKETING_TAGS[0]
    if isinstance(value, InputShapesConfig):
        return _BUCKETING_TAGS[1]
    if isinstance(value, dict):
        kinds = [tag for key, tag in zip(("sequence_lengths", "input_shapes"), _BUCKETING_TAGS) if key in value]
        return kinds[0] if len(kinds) == 1 else None
    return None


Bucketing = Annotated[
    Annotated[SequenceLengthsConfig, Tag(_BUCKETING_TAGS[0])] | Annotated[InputShapesConfig, Tag(_BUCKETING_TAGS[1])],
    Discriminator(
        _bucketing_kind,
        custom_error_type="bucketing",
        custom_error_message="bucketing must hold one of `sequence_lengths: [64, 128]` or `input_shapes: [[1, 64], [1, 128]]`",
    ),
]


# --------------------------------------------------------------------------- endpoints
class EndpointConfig(BaseModel):
    """One served pipeline."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="The task: a name or alias (question-answering/qa, text-classification/sentiment-analysis, ...)")
    model: str | None = Field(
        None,
        description="A directory with model.onnx, tokenizer.json and config.json, or the .onnx file beside them",
    )
    name: str | None = Field(None, description="The model name in /v2/models/<name>/infer; default <task>-<index>")
    route: str | None = Field(None, description="An extra route the endpoint answers POST requests on, e.g. /qa/predict")
    batch_size: int = Field(1, ge=1, description="The batch size the model is compiled for")
    bucketing: Bucketing | None = Field(None, description="The sequence lengths to compile for")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="More options for Pipeline.create (e.g. top_k, doc_stride)")

    @model_validator(mode="before")
    @classmethod
    def _compat(cls, data: Any) -> Any:
        data = _ignore(data, IGNORED_ENDPOINT_KEYS, "endpoint")
        if isinstance(data, dict) and "model_path" in data:
            if "model" in data:
                raise ValueError("give the model as `model` or `model_path`, not both")
            data = {("model" if k == "model_path" else k): v for k, v in data.items()}
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        tasks = _tasks()
        if task not in tasks:
            raise ValueError(f"unknown task {task!r}; the tasks are: {tasks.describe()}")
        return tasks.lookup(task).task

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: str | None) -> str | None:
        if model is None:
            return None
        if model.startswith("zoo:") or model.startswith("hf:"):
            raise ValueError(
                f"model {model!r}: SparseZoo and Hugging Face Hub stubs are not supported; download the model and give the path of "
                "a directory with model.onnx, tokenizer.json and config.json (sparseinfer.export.from_huggingface converts a checkpoint)"
            )
        from ..tasks.base import resolve_model_path

        model = os.path.expanduser(model)
        try:
            resolve_model_path(model)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return model

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME.match(name):
            raise ValueError(
                f"endpoint name {name!r} must be letters, digits, '_', '-' or '.' (it is part of the URL /v2/models/<name>/infer)"
            )
        return name

    @field_validator("route")
    @classmethod
    def _route(cls, route: str | None) -> str | None:
        if route is None:
            return None
        if not route.startswith("/"):
            route = "/" + route
        route = route.rstrip("/") or "/"
        if not _ROUTE.match(route):
            raise ValueError(
                f"route {route!r} must be a URL path such as /qa/predict (letters, digits, '_', '-', '.', '~' between slashes)"
            )
        if route in RESERVED_ROUTES or route == "/v2" or route.startswith("/v2/"):
            raise ValueError(
                f"route {route!r} is served by the server itself; choose another (the server's own paths: /v2/..., /docs, /redoc, /openapi.json)"
            )
        return route

    @model_validator(mode="after")
    def _check(self) -> EndpointConfig:
        if self.model is None:
            task_cls = _tasks().lookup(self.task)
            default = getattr(task_cls, "default_model_path", lambda: None)()
            if default is None:
                raise ValueError(
                    f"no model given for the {self.task!r} endpoint: set `model` (--model-path on the command line) to a directory with model.onnx, tokenizer.json and config.json"
                )
            self.model = str(default)
        if self.bucketing is not None and "sequence_length" in self.kwargs:
            raise ValueError("give the sequence lengths either in `bucketing` or as kwargs.sequence_length, not both")
        if isinstance(self.bucketing, InputShapesConfig):
            batches = {s[0] for s in self.bucketing.input_shapes if len(s) == 2}
            if batches - {self.batch_size}:
                raise ValueError(
                    f"bucketing.input_shapes have batch sizes {sorted(batches)}, but the endpoint's batch_size is {self.batch_size}"
                )
        if "batch_size" in self.kwargs:
            raise ValueError("set batch_size on the endpoint, not in kwargs")
        return self

    @property
    def sequence_length(self) -> int | list[int] | None:
        """What Pipeline.create gets as sequence_length (None: the pipeline's default)."""
        if isinstance(self.bucketing, SequenceLengthsConfig):
            lengths = self.bucketing.sequence_lengths
        elif isinstance(self.bucketing, InputShapesConfig):
            lengths = [s[-1] for s in self.bucketing.input_shapes]
        else:
            return self.kwargs.get("sequence_length")
        lengths = sorted(set(lengths))
        return lengths[0] if len(lengths) == 1 else lengths

    def pipeline_kwargs(self, num_cores: int | None = None) -> dict[str, Any]:
        """The keyword arguments of Pipeline.create (besides task and model_path)."""
        kwargs = dict(self.kwargs)
        kwargs["batch_size"] = self.batch_size
        if self.sequence_length is not None:
            kwargs["sequence_length"] = self.sequence_length
        if num_cores is not None:
            kwargs.setdefault("num_threads", num_cores)
        return kwargs


# --------------------------------------------------------------------------- the server
class ServerConfig(BaseModel):
    """The served endpoints and the cores they share."""

    model_config = ConfigDict(extra="forbid")

    num_cores: int | None = Field(None, ge=1, description="Threads per pipeline call (default: all the cores Numba has)")
    num_workers: int | None = Field(None, ge=1, description="Pipeline calls running at once across endpoints (default: cores // num_cores)")
    integration: str = Field("local", description="Only 'local' (DeepSparse compatibility)")
    endpoints: list[EndpointConfig] = Field(min_length=1, description="The pipelines to serve")

    @model_validator(mode="before")
    @classmethod
    def _compat(cls, data: Any) -> Any:
        return _ignore(data, IGNORED_SERVER_KEYS, "server config")

    @field_validator("integration")
    @classmethod
    def _local(cls, integration: str) -> str:
        if integration != "local":
            raise ValueError(f"integration {integration!r} is not supported; sparseinfer serves the 'local' layout only")
        return integration

    @field_validator("num_cores")
    @classmethod
    def _cores(cls, num_cores: int | None) -> int | None:
        if num_cores is not None and num_cores > available_cores():
            raise ValueError(
                f"num_cores={num_cores} exceeds the {available_cores()} threads Numba was started with "
                "(set NUMBA_NUM_THREADS before starting the server to allow more)"
            )
        return num_cores

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, endpoints: list[EndpointConfig]) -> list[EndpointConfig]:
        counters: Counter[str] = Counter()
        taken = {e.name for e in endpoints if e.name is not None}
        for e in endpoints:
            if e.name is None:
                # DeepSparse's default name: <task>-<index among the endpoints of that task>
                while f"{e.task}-{counters[e.task]}" in taken:
                    counters[e.task] += 1
                e.name = f"{e.task}-{counters[e.task]}"
                taken.add(e.name)
                counters[e.task] += 1
        names = Counter(e.name for e in endpoints)
        twice = sorted(n for n, k in names.items() if k > 1)
        if twice:
            raise ValueError(f"endpoint names must be unique; {', '.join(map(repr, twice))} is used more than once")
        routes = Counter(e.route for e in endpoints if e.route is not None)
        twice = sorted(r for r, k in routes.items() if k > 1)
        if twice:
            raise ValueError(f"endpoint routes must be unique; {', '.join(map(repr, twice))} is used more than once")
        return endpoints

    @property
    def threads_per_call(self) -> int:
        return self.num_cores or available_cores()

    @property
    def workers(self) -> int:
        """Pipeline calls that may run at once across all endpoints (each endpoint runs one at a time)."""
        if self.num_workers is not None:
            return self.num_workers
        return max(1, available_cores() // self.threads_per_call)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, data: Any, source: str = "server config") -> ServerConfig:
        """Validate a parsed config; a ConfigError names each bad key and why."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping with an `endpoints` list, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid {source}:\n{format_errors(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ServerConfig:
        return load_config(path)

    @classmethod
    def for_task(
        cls,
        task: str,
        model_path: str | None,
        *,
        batch_size: int = 1,
        sequence_length: int | list[int] | None = None,
        num_cores: int | None = None,
        num_workers: int | None = None,
        name: str | None = None,
        route: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> ServerConfig:
        """A one-endpoint config, as `sparseinfer serve --task T --model-path P` builds it."""
        endpoint: dict[str, Any] = {"task": task, "batch_size": batch_size, "kwargs": dict(kwargs or {})}
        if model_path is not None:
            endpoint["model"] = str(model_path)
        if name is not None:
            endpoint["name"] = name
        if route is not None:
            endpoint["route"] = route
        if sequence_length is not None:
            lengths = [sequence_length] if isinstance(sequence_length, int) else list(sequence_length)
            endpoint["bucketing"] = {"sequence_lengths": lengths}
        data: dict[str, Any] = {"endpoints": [endpoint]}
        if num_cores is not None:
            data["num_cores"] = num_cores
        if num_workers is not None:
            data["num_workers"] = num_workers
        return cls.from_dict(data, source="server options")


def format_errors(exc: ValidationError) -> str:
    """One line per error: where (e.g. endpoints.1.task) and the reason."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in _BUCKETING_TAGS)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike) -> ServerConfig:
    """Read a DeepSparse-style server config from a YAML file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {str(file)!r} is empty; it needs an `endpoints` list")
    return ServerConfig.from_dict(data, source=f"config file {str(file)!r}")
