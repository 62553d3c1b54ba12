"""Engine: compile a model once, run it many times.

Dimensions the model leaves open (batch, sequence) are bound either at construction
(`batch_size`, `sequence_length`, `input_shapes`) or on first use of each new input shape; each
distinct set of shapes gets its own plan, cached.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numba
import numpy as np
import onnx

from ..graph import Graph, import_onnx
from ..graph.ir import Shape
from ..graph.reference import ENGINE_DOMAIN
from ..graph.shapes import bind_dims
from ..passes import PassContext, analyze_weight, default_pipeline
from ..passes.quantize import block_density_4x1
from .plan import Plan, WeightCache

# Numba's "workqueue" threading layer (used where neither OpenMP nor TBB is available) aborts the
# process if two threads launch parallel kernels at once; runs are serialised on it.
_WORKQUEUE_LOCK = threading.Lock()


def _parallel_lock() -> threading.Lock | contextlib.nullcontext:
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is chosen at the first one
        return _WORKQUEUE_LOCK
    return _WORKQUEUE_LOCK if layer == "workqueue" else contextlib.nullcontext()


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` Numba threads (None: all of them), restoring the caller's setting after:
    Numba's thread count is per calling thread and would otherwise leak into later runs."""
    previous = numba.get_num_threads()
    numba.set_num_threads(n or numba.config.NUMBA_NUM_THREADS)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


class InputError(ValueError):
    """Inputs given to Engine.run do not match the model's inputs."""


class Engine:
    """Runs an ONNX model. `Engine("model.onnx")(inputs)` returns the outputs as NumPy arrays.

    `batch_size` fixes dim 0 and `sequence_length` dim 1 of every input that leaves them open;
    `input_shapes` ({name: shape} or a list in input order) fixes any dims. Dims left open are
    bound when `run` first sees them.
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto | Graph,
        batch_size: int | None = None,
        sequence_length: int | None = None,
        input_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
        num_threads: int | None = None,
        opt_level: int = 2,
        pass_config: Mapping | None = None,
        quantize: str | None = None,
    ) -> None:
        for label, v in (("batch_size", batch_size), ("sequence_length", sequence_length), ("num_threads", num_threads)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{label} must be a positive integer or None, got {v!r}")
        if num_threads is not None and num_threads > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(
                f"num_threads={num_threads} exceeds the {numba.config.NUMBA_NUM_THREADS} threads Numba was started with "
                "(set NUMBA_NUM_THREADS before importing sparseinfer to allow more)"
            )
        self.num_threads = num_threads
        self.opt_level = opt_level
        self.pass_config = dict(pass_config or {})
        if quantize is not None:
            if quantize != "int8":
                raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
            self.pass_config["quantize"] = quantize
        self._weights = WeightCache()
        self.model_path = None if isinstance(model, (onnx.ModelProto, Graph)) else Path(model)
        graph = model if isinstance(model, Graph) else import_onnx(model)
        self._graph = bind_dims(graph, self._fixed_shapes(graph, batch_size, sequence_length, input_shapes))
        self._plans: dict[tuple[Shape, ...], Plan] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ description
    @property
    def graph(self) -> Graph:
        """The imported graph, with the dims fixed at construction bound."""
        return self._graph

    @property
    def input_names(self) -> list[str]:
        return list(self._graph.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._graph.outputs)

    @property
    def input_shapes(self) -> list[Shape]:
        """Shapes of the inputs: ints where fixed, symbol names (or None) where still open."""
        return [self._graph.info(n).shape for n in self._graph.inputs]

    def __repr__(self) -> str:
        src = str(self.model_path) if self.model_path else self._graph.name
        shapes = ", ".join(f"{n}{list(s) if s is not None else '[?]'}" for n, s in zip(self.input_names, self.input_shapes))
        return f"Engine({src!r}, inputs=[{shapes}], outputs={self.output_names})"

    # ------------------------------------------------------------------ running
    def run(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs as a list in `input_names` order or a dict by name → outputs in `output_names` order."""
        feeds = self._check_inputs(inputs)
        plan = self._plan_for(feeds)
        with _parallel_lock(), _threads(self.num_threads):
            return plan.run(feeds)

    __call__ = run

    def mapped_run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name → outputs by name."""
        return dict(zip(self._graph.outputs, self.run(inputs)))

    def profile(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[dict]:
        """Run once and time every step: one row per node with its op, kernel or reference, and ms."""
        feeds = self._check_inputs(inputs)
        timings: list = []
        plan = self._plan_for(feeds)
        with _parallel_lock(), _threads(self.num_threads):
            plan.run(feeds, timings=timings)
        return [
            {"node": st.node.name or st.node.outputs[0], "op": st.node.op, "kind": st.kind, "ms": 1e3 * t, "flops": st.flops}
            for st, t in timings
        ]

    def describe(self) -> list[dict]:
        """Every Dense weight after optimisation: shape, measured sparsity, the storage chosen
        for it (layout, block) and the multiply-adds per token it costs, dense and as stored.
        The int8 matmuls of a quantized model file (QDense) are listed too, as quantize "int8"."""
        if self._plans:
            graph = next(iter(self._plans.values())).graph
        else:  # layouts do not depend on the bound shapes: optimise once with open dims set to 1
            graph = bind_dims(
                self._graph, {n: tuple(d if isinstance(d, int) else 1 for d in self._graph.info(n).shape or ()) for n in self._graph.inputs}
            )
            default_pipeline()(graph, PassContext(opt_level=self.opt_level, config=self.pass_config))
        rows = []
        for node in graph.nodes:
            if node.op not in ("Dense", "QDense") or node.domain != ENGINE_DOMAIN:
                continue
            w = graph.const(node.inputs[1])
            stats = analyze_weight(w)
            layout = node.attrs.get("layout", "dense")
            block = tuple(node.attrs.get("block") or ()) or None
            dense_flops = 2 * w.size
            if layout == "csr":
                stored = 2 * int(np.count_nonzero(w))
            elif layout == "bsr" and block not in stats.block_sparsity:  # the sparse int8 4x1 blocks, K zero padded
                stored = int(round(dense_flops * block_density_4x1(w)))
            elif layout == "bsr":
                stored = int(round(dense_flops * stats.density("bsr", block)))
            else:
                stored = dense_flops
            rows.append(
                {
                    "node": node.name or node.outputs[0],
                    "weight": node.inputs[1],
                    "shape": tuple(w.shape),
                    "sparsity": stats.sparsity,
                    "layout": layout,
                    "block": block,
                    "quantize": "int8" if node.op == "QDense" else node.attrs.get("quantize"),
                    "flops_per_token": dense_flops,
                    "stored_flops_per_token": stored,
                    "flops_saved": 1.0 - stored / dense_flops,
                }
            )
        return rows

    def plan(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> Plan:
        """The compiled plan that `run` uses for inputs of these shapes (compiled on first use)."""
        return self._plan_for(self._check_inputs(inputs))

    def _plan_for(self, feeds: dict[str, np.ndarray]) -> Plan:
        key = tuple(feeds[n].shape for n in self._graph.inputs)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = self._compile(dict(zip(self._graph.inputs, key)))
                    self._plans[key] = plan
        return plan

    def _compile(self, shapes: dict[str, Shape]) -> Plan:
        graph = bind_dims(self._graph, shapes)
        default_pipeline()(graph, PassContext(opt_level=self.opt_level, config=self.pass_config))
        return Plan(graph, self._weights)

    # ------------------------------------------------------------------ checking
    def _fixed_shapes(self, graph: Graph, batch_size, sequence_length, input_shapes) -> dict[str, Shape]:
        if input_shapes is not None and not isinstance(input_shapes, Mapping):
            input_shapes = list(input_shapes)
            if len(input_shapes) != len(graph.inputs):
                raise ValueError(
                    f"input_shapes lists {len(input_shapes)} shapes, but the model has {len(graph.inputs)} inputs {graph.inputs}"
                )
            input_shapes = dict(zip(graph.inputs, input_shapes))
        input_shapes = dict(input_shapes or {})
        unknown = sorted(set(input_shapes) - set(graph.inputs))
        if unknown:
            raise ValueError(f"input_shapes names {unknown}, which are not inputs of the model; its inputs are {graph.inputs}")
        fixed: dict[str, Shape] = {}
        for name in graph.inputs:
            shape = graph.info(name).shape
            if name in input_shapes:
                new = tuple(int(d) for d in input_shapes[name])
                if shape is not None:
                    if len(new) != len(shape):
                        raise ValueError(
                            f"input_shapes[{name!r}] = {list(new)} has rank {len(new)}, but the model's input has rank {len(shape)}"
                        )
                    for old, d in zip(shape, new):
                        if isinstance(old, int) and old != d:
                            raise ValueError(f"input_shapes[{name!r}] = {list(new)} conflicts with the model's fixed shape {list(shape)}")
                fixed[name] = new
                continue
            if shape is None:
                continue
            dims = list(shape)
            for axis, value in ((0, batch_size), (1, sequence_length)):
                if value is None or axis >= len(dims):
                    continue
                if isinstance(dims[axis], int) and dims[axis] != value:
                    label = "batch_size" if axis == 0 else "sequence_length"
                    raise ValueError(f"{label}={value}, but the model fixes dim {axis} of input {name!r} to {dims[axis]}")
                dims[axis] = int(value)
            fixed[name] = tuple(dims)
        return fixed

    def _check_inputs(self, inputs) -> dict[str, np.ndarray]:
        names = self._graph.inputs
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            missing = [n for n in names if n not in inputs]
            if unknown or missing:
                parts = ([f"unknown input(s) {unknown}"] if unknown else []) + ([f"missing input(s) {missing}"] if missing else [])
                raise InputError(f"{'; '.join(parts)}. The model's inputs are {names}")
            items = [(n, inputs[n]) for n in names]
        else:
            if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
                raise InputError(f"inputs must be a list of arrays (in the order {names}) or a dict by name, got {type(inputs).__name__}")
            if len(inputs) != len(names):
                raise InputError(f"got {len(inputs)} inputs, but the model takes {len(names)}: {names}")
            items = list(zip(names, inputs))
        feeds: dict[str, np.ndarray] = {}
        bound: dict[str, tuple[int, str]] = {}
        for name, value in items:
            info = self._graph.info(name)
            arr = _coerce(name, value, info.dtype)
            if info.shape is not None:
                if arr.ndim != len(info.shape):
                    raise InputError(
                        f"input {name!r} must have rank {len(info.shape)} (shape {_fmt(info.shape)}), got shape {list(arr.shape)}"
                    )
                for axis, (want, got) in enumerate(zip(info.shape, arr.shape)):
                    if isinstance(want, int) and want != got:
                        raise InputError(
                            f"input {name!r} has shape {list(arr.shape)}, but dim {axis} is fixed to {want} (expected {_fmt(info.shape)})"
                        )
                    if isinstance(want, str):
                        if want in bound and bound[want][0] != got:
                            raise InputError(
                                f"inputs disagree on dim {want!r}: {bound[want][1]!r} has {bound[want][0]}, {name!r} has {got}"
                            )
                        bound.setdefault(want, (got, name))
            feeds[name] = arr
        return feeds


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _coerce(name: str, value, dtype: np.dtype | None) -> np.ndarray:
    """An input as an array of the model's dtype; lossless integer and float-width changes are allowed."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r} could not be made into an array: {exc}") from None
    if dtype is None or arr.dtype == dtype:
        return arr
    if arr.dtype.kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InputError(f"input {name!r}: values out of range for {dtype} (min {arr.min()}, max {arr.max()})")
        return arr.astype(dtype)
    if arr.dtype.kind == "f" and dtype.kind == "f":
        return arr.astype(dtype)
    if arr.dtype.kind == "b" and dtype.kind == "b":
        return arr
    raise InputError(f"input {name!r} expects {dtype} values, got {arr.dtype}; convert it (e.g. np.asarray(x, dtype=np.{dtype.name}))")
