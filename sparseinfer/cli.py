"""The `sparseinfer` command line (also `python -m sparseinfer`).

    sparseinfer benchmark model.onnx -b 8 -s async -nstreams 2 -t 20 -x results.json
    sparseinfer analyze model_dir --seq 128 --plot layers.png
    sparseinfer sparsify model_dir --sparsity 0.9 --block 4x1 --quantize int8 -o pruned-int8/
    sparseinfer run --task sentiment-analysis --model-path model_dir "I loved it" "Not again"
    sparseinfer serve --task qa --model-path model_dir --port 5543

`benchmark` and `analyze` take the flags of `deepsparse.benchmark` / `deepsparse.analyze`
(`-b`, `-i/-shapes`, `-s`, `-t`, `-w`, `-nstreams`, `-ncores`, `-e`, `-x`, `-q`), so existing
scripts carry over. A MODEL is an .onnx file or a directory holding model.onnx.

Mistakes in the command (a missing model, a malformed shape, an out-of-range value) end with a
one-line message on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from pydantic import ValidationError

__all__ = ["main", "parse_input_shapes", "parse_block", "UsageError"]

SERVER_EXTRA_MESSAGE = "the server needs the 'server' extra: pip install 'sparseinfer[server]'"
DEFAULT_SEQUENCE_LENGTH = 128
DEFAULT_VOCAB = 100  # token ids are drawn below this when the model's embedding table is not found


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit code 2."""


# =============================================================================== argument types
Shapes = list[tuple[int, ...]] | dict[str, tuple[int, ...]]

_SHAPE_HELP = (
    "shapes are given as '[1,128],[1,128],[1,128]' (in input order; one shape applies to every input), "
    "or by name as 'input_ids:1x128,attention_mask:1x128'"
)


def _dims(text: str, whole: str) -> tuple[int, ...]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty shape in {whole!r}; {_SHAPE_HELP}")
    parts = [p.strip() for p in text.split("," if "," in text else "x")]
    dims = []
    for p in parts:
        if not p:
            raise argparse.ArgumentTypeError(f"a dimension is missing in {whole!r}; {_SHAPE_HELP}")
        if not re.fullmatch(r"\d+", p) or int(p) < 1:
            raise argparse.ArgumentTypeError(f"{p!r} in {whole!r} is not a positive integer dimension; {_SHAPE_HELP}")
        dims.append(int(p))
    return tuple(dims)


def parse_input_shapes(text: str) -> Shapes:
    """'[1,128],[1,128]' → [(1, 128), (1, 128)]; 'input_ids:1x128,mask:1x128' → {name: shape};
    '1x128' or '[1,128]' → [(1, 128)] (one shape for every input)."""
    s = text.strip()
    if not s:
        raise argparse.ArgumentTypeError(f"no shapes given; {_SHAPE_HELP}")
    if ":" in s:
        named: dict[str, tuple[int, ...]] = {}
        # items are separated by commas outside brackets
        for item in re.split(r",(?![^\[]*\])", s):
            item = item.strip()
            if not item:
                continue
            name, sep, dims = item.rpartition(":")
            name = name.strip()
            if not sep or not name:
                raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not name:shape; {_SHAPE_HELP}")
            if name in named:
                raise argparse.ArgumentTypeError(f"input {name!r} is given twice in {text!r}")
            named[name] = _dims(dims, text)
        return named
    if s.startswith("[["):  # one outer pair of brackets around the list
        if not s.endswith("]]"):
            raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}; {_SHAPE_HELP}")
        s = s[1:-1]
    if "[" in s or "]" in s:
        groups = re.findall(r"\[([^\[\]]*)\]", s)
        rest = re.sub(r"\[[^\[\]]*\]", "", s)
        if not groups or rest.replace(",", "").strip():
            raise argparse.ArgumentTypeError(f"could not read {text!r}; {_SHAPE_HELP}")
        return [_dims(g, text) for g in groups]
    if "," in s and "x" in s:  # "1x128,1x128"
        return [_dims(g, text) for g in s.split(",")]
    return [_dims(s, text)]


def parse_block(text: str) -> tuple[int, int]:
    """'4x1' (also '4,1' or '4:1') → (4, 1)."""
    m = re.fullmatch(r"\s*\(?\s*(\d+)\s*[x,:×]\s*(\d+)\s*\)?\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"block must be two positive integers ROWSxCOLS of the [K, N] weight view, e.g. 4x1; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= `lowest`, with `what` in the error message."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite, non-negative number of seconds, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.9, got {text!r}") from None


def _sequence_lengths(text: str) -> int | list[int]:
    values = [_positive_int(p) for p in re.split(r"[,\s]+", text.strip()) if p]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a sequence length such as 128, or several such as 64,128; got {text!r}")
    return values[0] if len(values) == 1 else values


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. top_k=2), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


# =============================================================================== shared helpers
def _model_file(model: str) -> Path:
    """The .onnx file of a MODEL argument (a file, or a directory with model.onnx)."""
    if model.startswith("zoo:"):
        raise UsageError(f"{model!r}: SparseZoo stubs are not supported; download the model and pass its .onnx file or directory")
    path = Path(model)
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.onnx"))
            hint = f"; it holds {', '.join(found)}: pass one of them" if found else ""
            raise UsageError(f"directory {model!r} has no model.onnx{hint}")
        return candidate
    if not path.exists():
        raise UsageError(f"model {model!r} does not exist: pass an .onnx file or a directory holding model.onnx")
    if not path.is_file():
        raise UsageError(f"model {model!r} is not a file")
    return path


@contextlib.contextmanager
def _progress(message: str, quiet: bool) -> Iterator[None]:
    """'message … 1.2 s' on stderr around a slow step (nothing with -q)."""
    if quiet:
        yield
        return
    print(f"{message} …", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


_ORT_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}


class _InputSpec:
    def __init__(self, name: str, shape: Sequence | None, dtype: Any) -> None:
        self.name = name
        self.shape = None if shape is None else tuple(shape)
        self.dtype = np.dtype(dtype if dtype is not None else np.int64)


def _resolve_shapes(
    specs: Sequence[_InputSpec], given: Shapes | None, batch_size: int | None, sequence_length: int | None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape per input: --input_shapes where given; open dims 0 and 1 of the others
    from the batch size (default 1) and sequence length (default 128)."""
    names = [s.name for s in specs]
    if isinstance(given, list):
        if len(given) == 1 and len(specs) > 1:
            given = [given[0]] * len(specs)
        if len(given) != len(specs):
            raise UsageError(f"--input_shapes lists {len(given)} shapes, but the model has {len(specs)} inputs {names}")
        given = dict(zip(names, given))
    given = dict(given or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--input_shapes names {unknown}, which are not inputs of the model; its inputs are {names}")
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in given:
            new = given[spec.name]
            if spec.shape is not None:
                if len(new) != len(spec.shape):
                    raise UsageError(
                        f"--input_shapes gives {spec.name!r} rank {len(new)} {list(new)}, but the model's input has rank {len(spec.shape)}"
                    )
                for old, d in zip(spec.shape, new):
                    if isinstance(old, int) and old != d:
                        raise UsageError(
                            f"--input_shapes gives {spec.name!r} {list(new)}, but the model fixes its shape to {_fmt(spec.shape)}"
                        )
            for axis, value, flag in ((0, batch_size, "--batch_size"), (1, sequence_length, "--sequence_length")):
                if value is not None and len(new) > axis and new[axis] != value:
                    raise UsageError(f"{flag} {value} conflicts with --input_shapes, which gives {spec.name!r} {list(new)}")
            shapes[spec.name] = tuple(new)
            continue
        if spec.shape is None:
            raise UsageError(f"the model does not say the rank of input {spec.name!r}: give its shape with --input_shapes")
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                if axis == 0 and batch_size is not None and d != batch_size:
                    raise UsageError(f"--batch_size {batch_size}, but the model fixes dim 0 of input {spec.name!r} to {d}")
                if axis == 1 and sequence_length is not None and d != sequence_length:
                    raise UsageError(f"--sequence_length {sequence_length}, but the model fixes dim 1 of input {spec.name!r} to {d}")
                dims.append(d)
            elif axis == 0:
                dims.append(batch_size or 1)
            elif axis == 1:
                dims.append(sequence_length or DEFAULT_SEQUENCE_LENGTH)
            else:
                raise UsageError(f"dim {axis} of input {spec.name!r} is open ({_fmt(spec.shape)}): give its shape with --input_shapes")
        shapes[spec.name] = tuple(dims)
    return shapes


def _fmt(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    distinct = {tuple(s) for s in shapes.values()}
    if len(distinct) == 1:
        return _fmt(next(iter(distinct)))
    return ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())


def _embedding_rows(model_file: Path) -> dict[str, int]:
    """Rows of the table each integer input indexes directly (a Gather of a constant table):
    the vocabulary size for input_ids, the number of token types for token_type_ids."""
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # the engine reports unreadable models itself
        return {}
    tables = {t.name: int(t.dims[0]) for t in proto.graph.initializer if len(t.dims) >= 1}
    inputs = {i.name for i in proto.graph.input} - set(tables)
    rows: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs and node.input[0] in tables:
            rows.setdefault(node.input[1], tables[node.input[0]])
    return rows


def make_feeds(
    specs: Sequence[_InputSpec], shapes: Mapping[str, Sequence[int]], vocab: Mapping[str, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: token ids below the embedding table's size (else 100), attention masks of
    ones, uniform floats."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape, dtype = tuple(shapes[spec.name]), spec.dtype
        if "mask" in spec.name.lower():
            arr = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            arr = rng.integers(0, max(1, vocab.get(spec.name, DEFAULT_VOCAB)), shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.random(shape) < 0.5
        else:
            arr = rng.uniform(size=shape).astype(dtype)
        feeds[spec.name] = arr
    return feeds


class _Runner:
    """One inference backend, as the benchmark sees it."""

    name: str
    specs: list[_InputSpec]
    num_threads: int | None

    def run(self, feeds: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError


class _SparseinferRunner(_Runner):
    name = "sparseinfer"

    def __init__(self, model_file: Path, num_threads: int | None, quantize: str | None = None) -> None:
        from . import Engine

        self.engine = Engine(model_file, num_threads=num_threads, quantize=quantize)
        self.num_threads = num_threads
        g = self.engine.graph
        self.specs = [_InputSpec(n, g.info(n).shape, g.info(n).dtype) for n in g.inputs]

    def run(self, feeds):
        return self.engine.run(feeds)


class _OnnxruntimeRunner(_Runner):
    name = "onnxruntime"

    def __init__(self, model_file: Path, num_threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("-e onnxruntime needs the onnxruntime package, which is not installed: pip install onnxruntime") from None
        so = ort.SessionOptions()
        if num_threads:
            so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise UsageError(f"onnxruntime could not load {str(model_file)!r}: {exc}") from None
        self.num_threads = num_threads
        self.version = ort.__version__
        self.specs = []
        for i in self.session.get_inputs():
            dtype = _ORT_DTYPES.get(i.type)
            if dtype is None:
                raise UsageError(f"input {i.name!r} has type {i.type}, which the benchmark cannot generate")
            shape = None if i.shape is None else [d if isinstance(d, int) and d > 0 else (d or None) for d in i.shape]
            self.specs.append(_InputSpec(i.name, shape, dtype))

    def run(self, feeds):
        return self.session.run(None, feeds)


def _runner(engine: str, model_file: Path, num_threads: int | None, quantize: str | None = None) -> _Runner:
    if engine == "onnxruntime":
        return _OnnxruntimeRunner(model_file, num_threads)
    return _SparseinferRunner(model_file, num_threads, quantize)


def _write_json(path: str, data: Any) -> None:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"export path {path!r} is a directory; give the name of the .json file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _args_record(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug") and not callable(v)}


def _check_quantize(value: str | None, engine: str = "sparseinfer") -> None:
    if value not in (None, "int8"):
        raise UsageError(f"--quantize {value}: the only quantization is int8")
    if value is not None and engine != "sparseinfer":
        raise UsageError("--quantize applies to -e sparseinfer; for onnxruntime quantize the model file first (onnxruntime.quantization)")


# =============================================================================== benchmark
def _latency_stats(latencies: Sequence[float], items: int, elapsed: float, batch: int) -> dict:
    ms = np.asarray(latencies, dtype=np.float64) * 1e3
    return {
        "items_per_sec": items / elapsed if elapsed > 0 else float("nan"),
        "latency_mean_ms": float(ms.mean()),
        "latency_median_ms": float(np.median(ms)),
        "latency_std_ms": float(ms.std()),
        "latency_p90_ms": float(np.percentile(ms, 90)),
        "latency_p95_ms": float(np.percentile(ms, 95)),
        "latency_p99_ms": float(np.percentile(ms, 99)),
        "latency_min_ms": float(ms.min()),
        "latency_max_ms": float(ms.max()),
        "iterations": int(ms.size),
        "items": int(items),
        "batch_size": int(batch),
        "elapsed_s": float(elapsed),
    }


def _run_for(fn: Callable[[], Any], seconds: float, latencies: list[float] | None = None, start: float | None = None) -> float:
    """Call fn until `seconds` have passed since `start` (at least once when recording); returns the end time."""
    start = time.perf_counter() if start is None else start
    deadline = start + seconds
    now = time.perf_counter()
    if latencies is None and now >= deadline:
        return now
    while True:
        t0 = time.perf_counter()
        fn()
        now = time.perf_counter()
        if latencies is not None:
            latencies.append(now - t0)
        if now >= deadline:
            return now


def _measure_sync(runner: _Runner, feeds: dict, seconds: float, warmup: float) -> tuple[list[float], float]:
    _run_for(lambda: runner.run(feeds), warmup)
    latencies: list[float] = []
    start = time.perf_counter()
    end = _run_for(lambda: runner.run(feeds), seconds, latencies, start)
    return latencies, end - start


def _measure_async(runner: _Runner, feeds: dict, seconds: float, warmup: float, streams: int) -> tuple[list[float], float]:
    """`streams` threads each run requests back to back, warming up together, then measuring together."""
    window: dict[str, float] = {}
    warm = threading.Barrier(streams, action=lambda: window.__setitem__("warmup", time.perf_counter()))
    go = threading.Barrier(streams, action=lambda: window.__setitem__("start", time.perf_counter()))
    per_stream: list[list[float]] = [[] for _ in range(streams)]
    ends = [0.0] * streams
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            warm.wait()
            _run_for(lambda: runner.run(feeds), warmup, start=window["warmup"])
            go.wait()
            ends[i] = _run_for(lambda: runner.run(feeds), seconds, per_stream[i], window["start"])
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
            warm.abort()
            go.abort()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True, name=f"stream-{i}") for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    latencies = [x for lat in per_stream for x in lat]
    return latencies, max(ends) - window["start"]


_SUMMARY = [
    ("items_per_sec", "Throughput (items/sec)", "{:.4f}"),
    ("latency_mean_ms", "Latency Mean (ms/batch)", "{:.4f}"),
    ("latency_median_ms", "Latency Median (ms/batch)", "{:.4f}"),
    ("latency_std_ms", "Latency Std (ms/batch)", "{:.4f}"),
    ("latency_p90_ms", "Latency p90 (ms/batch)", "{:.4f}"),
    ("latency_p95_ms", "Latency p95 (ms/batch)", "{:.4f}"),
    ("latency_p99_ms", "Latency p99 (ms/batch)", "{:.4f}"),
    ("iterations", "Iterations", "{}"),
]


def cmd_benchmark(args: argparse.Namespace) -> int:
    _check_quantize(args.quantize, args.engine)
    model_file = _model_file(args.model)
    if args.engine == "sparseinfer":
        import numba

        available = numba.config.NUMBA_NUM_THREADS
    else:
        available = os.cpu_count() or 1
    streams = 1
    if args.scenario == "async":
        streams = args.num_streams or max(2, (args.num_cores or available) // 2)
    elif args.num_streams and args.num_streams > 1:
        _note(f"note: -nstreams {args.num_streams} applies to the async scenario; the sync scenario runs one stream", args.quiet)
    # The streams share the cores: each request runs on its part of them.
    threads = args.num_cores
    if streams > 1 and (args.num_cores or args.engine == "sparseinfer"):
        threads = max(1, (args.num_cores or available) // streams)

    with _progress(f"loading {model_file} ({args.engine})", args.quiet):
        runner = _runner(args.engine, model_file, threads, args.quantize)
    shapes = _resolve_shapes(runner.specs, args.input_shapes, args.batch_size, args.sequence_length)
    feeds = make_feeds(runner.specs, shapes, _embedding_rows(model_file))
    batch = int(next(iter(shapes.values()))[0]) if shapes and next(iter(shapes.values())) else 1
    what = "compiling plan for" if args.engine == "sparseinfer" else "first run for"
    t0 = time.perf_counter()
    with _progress(f"{what} {_shapes_text(shapes)}", args.quiet):
        runner.run(feeds)
    compile_s = time.perf_counter() - t0

    _note(
        f"benchmarking {args.scenario}, {streams} stream(s), {args.time:g} s after {args.warmup_time:g} s of warm-up …",
        args.quiet,
    )
    if args.scenario == "async":
        latencies, elapsed = _measure_async(runner, feeds, args.time, args.warmup_time, streams)
    else:
        latencies, elapsed = _measure_sync(runner, feeds, args.time, args.warmup_time)
    stats = _latency_stats(latencies, batch * len(latencies), elapsed, batch)

    from . import __version__

    report = {
        "version": __version__,
        "model_path": str(model_file),
        "engine": args.engine,
        "engine_version": getattr(runner, "version", __version__),
        "scenario": args.scenario,
        "num_streams": streams,
        "num_cores": args.num_cores,
        "threads_per_request": threads,
        "input_shapes": {n: list(s) for n, s in shapes.items()},
        "seconds_to_run": args.time,
        "warmup_time": args.warmup_time,
        "compile_s": compile_s,
        **stats,
        "args": _args_record(args),
    }
    print(f"Original Model Path: {args.model}")
    print(f"Engine: {args.engine} {report['engine_version']}")
    print(f"Batch Size: {batch}")
    print(f"Input Shapes: {', '.join(f'{n} {_fmt(s)}' for n, s in shapes.items())}")
    print(f"Scenario: {args.scenario}")
    if args.scenario == "async":
        print(f"Streams: {streams}")
    print(f"Threads per request: {threads if threads else 'all'}")
    for key, label, fmt in _SUMMARY:
        print(f"{label}: {fmt.format(stats[key])}")
    if args.export_path:
        _write_json(args.export_path, report)
        _note(f"wrote {args.export_path}", args.quiet)
    return 0


# =============================================================================== analyze
def _analyze(args: argparse.Namespace) -> dict:
    model_file = _model_file(args.model)
    with _progress(f"loading {model_file}", args.quiet):
        runner = _SparseinferRunner(model_file, args.num_cores)
    engine = runner.engine
    shapes = _resolve_shapes(runner.specs, args.input_shapes, args.batch_size, args.sequence_length)
    feeds = make_feeds(runner.specs, shapes, _embedding_rows(model_file))
    with _progress(f"compiling plan for {_shapes_text(shapes)}", args.quiet):
        engine.run(feeds)
    for _ in range(args.num_warmup_iterations):
        engine.run(feeds)
    with _progress(f"profiling {args.num_iterations} run(s)", args.quiet):
        profiles = [engine.profile(feeds) for _ in range(args.num_iterations)]
    plan = engine.plan(feeds)
    weights = {row["node"]: row for row in engine.describe()}
    layers = []
    for i, step in enumerate(plan.steps):
        node = step.node
        name = node.name or node.outputs[0]
        ms = statistics.median(p[i]["ms"] for p in profiles)
        shape = plan.graph.info(node.outputs[0]).shape
        w = weights.get(name) if node.op in ("Dense", "QDense") else None
        layers.append(
            {
                "index": i,
                "node": name,
                "op": node.op,
                "kind": step.kind,
                "output_shape": None if shape is None else list(shape),
                "layout": w["layout"] if w else None,
                "sparsity": w["sparsity"] if w else None,
                "block": list(w["block"]) if w and w["block"] else None,
                "weight_shape": list(w["shape"]) if w else None,
                "ms": ms,
                "flops": int(step.flops),
                "gflops_per_s": step.flops / (ms * 1e6) if step.flops and ms > 0 else None,
            }
        )
    total = sum(r["ms"] for r in layers)
    ops: dict[str, dict] = {}
    for r in layers:
        o = ops.setdefault(r["op"], {"op": r["op"], "kinds": [], "count": 0, "ms": 0.0, "flops": 0})
        o["count"] += 1
        o["ms"] += r["ms"]
        o["flops"] += r["flops"]
        if r["kind"] not in o["kinds"]:
            o["kinds"].append(r["kind"])
    op_rows = sorted(ops.values(), key=lambda o: -o["ms"])
    for o in op_rows:
        o["percent"] = 100.0 * o["ms"] / total if total > 0 else 0.0
        o["gflops_per_s"] = o["flops"] / (o["ms"] * 1e6) if o["flops"] and o["ms"] > 0 else None
    dense = list(weights.values())
    layouts: dict[str, int] = {}
    for w in dense:
        layouts[w["layout"]] = layouts.get(w["layout"], 0) + 1
    flops_dense = sum(w["flops_per_token"] for w in dense)
    flops_stored = sum(w["stored_flops_per_token"] for w in dense)
    from . import __version__

    return {
        "version": __version__,
        "model_path": str(model_file),
        "input_shapes": {n: list(s) for n, s in shapes.items()},
        "num_threads": args.num_cores,
        "iterations": args.num_iterations,
        "total_ms": total,
        "steps": len(layers),
        "layers": layers,
        "ops": op_rows,
        "dense_weights": {
            "count": len(dense),
            "layouts": layouts,
            "flops_per_token": flops_dense,
            "stored_flops_per_token": flops_stored,
            "flops_saved": 1.0 - flops_stored / flops_dense if flops_dense else 0.0,
        },
    }


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _print_analysis(report: dict) -> None:
    print(f"Model: {report['model_path']}")
    print(f"Input shapes: {', '.join(f'{n} {_fmt(s)}' for n, s in report['input_shapes'].items())}")
    print(f"Threads: {report['num_threads'] or 'all'}; median of {report['iterations']} profiled run(s)")
    print()
    header = f"{'#':>3}  {'node':<44}  {'op':<18} {'kind':<9} {'output shape':<18} {'layout':<6} {'sparsity':>8} {'block':<5} {'ms':>9} {'GFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for r in report["layers"]:
        shape = _fmt(r["output_shape"]) if r["output_shape"] is not None else "?"
        block = "x".join(map(str, r["block"])) if r["block"] else "-"
        print(
            f"{r['index']:>3}  {_short(r['node'], 44):<44}  {_short(r['op'], 18):<18} {r['kind']:<9} {shape:<18} "
            f"{r['layout'] or '-':<6} {_num(r['sparsity'], '{:.1%}'):>8} {block:<5} {r['ms']:>9.3f} {_num(r['gflops_per_s'], '{:.2f}'):>8}"
        )
    print()
    print(f"{'op':<20} {'kind':<18} {'count':>5} {'ms':>9} {'%':>6} {'GFLOP/s':>8}")
    for o in report["ops"]:
        print(
            f"{o['op']:<20} {'/'.join(o['kinds']):<18} {o['count']:>5} {o['ms']:>9.3f} {o['percent']:>6.1f} {_num(o['gflops_per_s'], '{:.2f}'):>8}"
        )
    print(f"{'total':<20} {'':<18} {report['steps']:>5} {report['total_ms']:>9.3f} {100.0:>6.1f}")
    d = report["dense_weights"]
    if d["count"]:
        layouts = ", ".join(f"{k} {v}" for k, v in sorted(d["layouts"].items()))
        print()
        print(f"Dense weights: {d['count']} ({layouts}); stored multiply-adds save {d['flops_saved']:.1%} of the dense FLOPs")


def _plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    layers = report["layers"]
    ops = list(dict.fromkeys(r["op"] for r in layers))
    cmap = plt.get_cmap("tab20")
    colors = {op: cmap(i % 20) for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(layers) + 1.5)))
    y = np.arange(len(layers))
    ax.barh(y, [r["ms"] for r in layers], color=[colors[r["op"]] for r in layers])
    ax.set_yticks(y, [f"{r['index']} {_short(r['node'], 40)}" for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median)")
    ax.set_title(f"{Path(report['model_path']).name} {_shapes_text(report['input_shapes'])}: time per step")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[o], label=o) for o in ops], fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_analyze(args: argparse.Namespace) -> int:
    report = _analyze(args)
    report["args"] = _args_record(args)
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        _print_analysis(report)
    if args.export_path:
        _write_json(args.export_path, report)
        _note(f"wrote {args.export_path}", args.quiet)
    if args.plot:
        _plot(report, args.plot)
        _note(f"wrote {args.plot}", args.quiet)
    return 0


# =============================================================================== sparsify
_WEIGHT_SUFFIXES = (".onnx", ".data", ".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ot")
_COMPANION_SUFFIXES = (".json", ".txt", ".model")


def _copy_companions(source_dir: Path, out_dir: Path) -> list[str]:
    """Tokenizer and config files (not weights) from a model directory, so OUT is a model directory too."""
    copied = []
    for p in sorted(source_dir.iterdir()):
        if p.is_file() and p.suffix in _COMPANION_SUFFIXES and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, out_dir / p.name)
            copied.append(p.name)
        elif p.is_dir() and re.match(r"\d+_", p.name):  # sentence-transformers modules (Pooling, Normalize)
            for q in sorted(p.rglob("*.json")):
                target = out_dir / q.relative_to(source_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(q, target)
                copied.append(str(q.relative_to(source_dir)))
    return copied


def cmd_sparsify(args: argparse.Namespace) -> int:
    from .export.int8_model import quantize
    from .passes.prune import prune, weight_sparsity

    _check_quantize(args.quantize)
    if args.sparsity is None and args.quantize is None:
        raise UsageError("nothing to do: give --sparsity to prune, --quantize int8 to quantize, or both (pruning comes first)")
    if args.sparsity is None:
        given = [flag for flag, value in (("--block", args.block), ("--include", args.include), ("--heads", args.heads)) if value]
        given += [flag for flag, value in (("--embeddings", args.embeddings), ("--exclude", args.exclude)) if value]
        if args.scope != "per-layer":
            given.append("--scope")
        if given:
            raise UsageError(f"{', '.join(given)} only apply to pruning: give --sparsity too (or leave them out to only quantize)")
    elif not 0.0 <= args.sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1) (the fraction of weights to zero: 0.9 zeroes 90%), got {args.sparsity:g}")
    model_file = _model_file(args.model)
    out = Path(args.output)
    to_dir = out.suffix != ".onnx"
    out_file = out / "model.onnx" if to_dir else out
    if out_file.exists() and os.path.samefile(out_file, model_file):
        raise UsageError(f"-o {args.output!r} would overwrite the source model; write the sparsified model elsewhere")
    source = model_file
    if args.sparsity is not None:
        with _progress(
            f"pruning {model_file} to {args.sparsity:.0%} ({args.scope}, block {'x'.join(map(str, args.block)) if args.block else 'none'})",
            args.quiet,
        ):
            source = prune(
                model_file,
                sparsity=args.sparsity,
                block=args.block,
                scope=args.scope,
                out=None if args.quantize else out_file,
                include=args.include,
                exclude=args.exclude,
                heads=args.heads,
                embeddings=args.embeddings,
            )
    quantized = None
    if args.quantize:
        with _progress(f"quantizing the encoder's linear layers to {args.quantize}", args.quiet):
            kept = {t.name for t in quantize(source, out=out_file).graph.initializer}
        quantized = {r["name"] for r in weight_sparsity(source) if r["role"] != "embedding" and r["name"] not in kept}
    copied = []
    if to_dir:
        source_dir = model_file.parent
        if (source_dir / "config.json").is_file() or (source_dir / "tokenizer.json").is_file():
            copied = _copy_companions(source_dir, out)
    # the weights as pruned (fp32): an int8 weight keeps the zeros (0 quantizes to 0)
    rows = weight_sparsity(source if quantized is not None else out_file, block=args.block)
    width = min(64, max((len(r["name"]) for r in rows), default=4))
    head = f"{'weight':<{width}}  {'role':<9} {'shape':<14} {'sparsity':>8}"
    if args.block:
        head += f" {'block sparsity':>14}"
    if quantized is not None:
        head += f" {'dtype':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{_short(r['name'], width):<{width}}  {r['role']:<9} {_fmt(r['shape']):<14} {r['sparsity']:>8.1%}"
        if args.block:
            line += f" {_num(r['block_sparsity'], '{:.1%}'):>14}"
        if quantized is not None:
            line += f" {'int8' if r['name'] in quantized else 'fp32':>5}"
        print(line)
    by_role: dict[str, list[int]] = {}
    for r in rows:
        zeros_size = by_role.setdefault(r["role"], [0, 0])
        zeros_size[0] += r["zeros"]
        zeros_size[1] += r["size"]
    print()
    print("zeros by role: " + "; ".join(f"{role} {z / n:.1%} of {n} elements" for role, (z, n) in by_role.items() if n))
    if quantized is not None:
        print(
            f"int8: {len(quantized)} linear weights (symmetric per output channel; activations quantized per tensor at run time, "
            "DynamicQuantizeLinear + MatMulInteger)"
        )
    print(f"wrote {out_file}" + (f" (with {', '.join(copied)})" if copied else ""))
    return 0


# =============================================================================== run
def _dump(result: Any) -> Any:
    if hasattr(result, "model_dump"):
        return result.model_dump()
    if isinstance(result, (list, tuple)):
        return [_dump(r) for r in result]
    return result


def _read_stdin_inputs() -> list[tuple[tuple, dict]]:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no input: give texts as arguments, or one input per line on stdin (text, or a JSON object of the task's fields)")
    calls = []
    for number, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"stdin line {number} starts with '{{' but is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"stdin line {number}: a JSON input must be an object of the task's fields")
            calls.append(((), obj))
        else:
            calls.append(((line,), {}))
    if not calls:
        raise UsageError("no input: stdin was empty")
    return calls


def cmd_run(args: argparse.Namespace) -> int:
    from .tasks import TASKS, Pipeline

    try:
        task_cls = TASKS.lookup(args.task)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    is_qa = task_cls.task == "question-answering"
    if (args.question is None) != (args.context is None):
        raise UsageError("give both --question and --context")
    if args.question is not None:
        if not is_qa:
            raise UsageError(f"--question/--context are for the question-answering task, not {task_cls.task!r}")
        if args.texts:
            raise UsageError("give the input either as --question/--context or as texts, not both")
        calls = [((), {"question": args.question, "context": args.context})]
    elif args.texts:
        calls = [((t,), {}) for t in args.texts]
    else:
        calls = _read_stdin_inputs()
    if is_qa and any(a for a, _ in calls):
        raise UsageError(
            'question-answering takes --question Q --context C, or JSON lines {"question": ..., "context": ...} on stdin, not plain text'
        )
    if args.batch:
        if any(kw for _, kw in calls):
            raise UsageError("--batch groups plain-text inputs into one call; JSON and --question inputs give their own lists")
        calls = [(([a[0] for a, _ in calls],), {})]

    kwargs = dict(args.kw or [])
    with _progress(f"loading {args.model_path} ({task_cls.task})", args.quiet):
        try:
            pipeline = Pipeline.create(
                args.task,
                args.model_path,
                sequence_length=args.sequence_length,
                batch_size=args.batch_size,
                num_threads=args.num_cores,
                quantize=args.quantize,
                **kwargs,
            )
        except TypeError as exc:
            raise UsageError(f"{exc} (check the --kw options)") from None
    lengths = pipeline.sequence_lengths
    with _progress(f"compiling plan(s) for batch {pipeline.batch_size}, sequence length(s) {lengths}", args.quiet):
        pipeline.warmup()
    for call_args, call_kwargs in calls:
        result = pipeline(*call_args, **call_kwargs)
        print(json.dumps(_dump(result), ensure_ascii=False, default=_json_default), flush=True)
    return 0


# =============================================================================== serve
_SERVER_EXTRAS = {"fastapi", "uvicorn", "starlette", "yaml", "httpx", "multipart", "python_multipart", "anyio"}


def cmd_serve(argv: Sequence[str]) -> int:
    """Hand the arguments to the server's own command line."""
    try:
        from .server import cli_main
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in _SERVER_EXTRAS or (exc.name or "").startswith("sparseinfer.server"):
            print(SERVER_EXTRA_MESSAGE, file=sys.stderr)
            return 2
        raise
    except ImportError:  # the package is there but has no entry point
        print(f"sparseinfer serve is not available in this installation; {SERVER_EXTRA_MESSAGE}", file=sys.stderr)
        return 2
    try:
        return int(cli_main(list(argv)) or 0)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in _SERVER_EXTRAS:
            print(SERVER_EXTRA_MESSAGE, file=sys.stderr)
            return 2
        raise


# =============================================================================== parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_model_shape_args(p: argparse.ArgumentParser, quiet_help: str) -> None:
    p.add_argument("model", help="an .onnx file, or a directory holding model.onnx")
    p.add_argument("-b", "--batch_size", "--batch-size", type=_positive_int, default=None, help="batch size (default 1)")
    p.add_argument(
        "-i",
        "-shapes",
        "--input_shapes",
        "--input-shapes",
        type=parse_input_shapes,
        default=None,
        metavar="SHAPES",
        help="input shapes: '[1,128],[1,128],[1,128]' in input order, or 'input_ids:1x128,attention_mask:1x128'",
    )
    p.add_argument(
        "--seq",
        "-seq_len",
        "--sequence_length",
        "--sequence-length",
        dest="sequence_length",
        type=_positive_int,
        default=None,
        help=f"sequence length where the model leaves it open (default {DEFAULT_SEQUENCE_LENGTH})",
    )
    p.add_argument("-ncores", "--num_cores", "--num-cores", type=_positive_int, default=None, help="threads to run on (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")

    parser = _Parser(
        prog="sparseinfer",
        description="A sparse inference engine for BERT-family ONNX models: benchmark, analyze, sparsify, run and serve them.",
        parents=[debug],
    )
    parser.add_argument("--version", action="version", version=f"sparseinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    # ---- benchmark
    p = sub.add_parser(
        "benchmark",
        parents=[debug],
        help="measure throughput and latency (flags of deepsparse.benchmark)",
        description="Run a model on random inputs for a while and report throughput and latency percentiles.",
    )
    _add_model_shape_args(p, "no progress messages on stderr (the results are still printed)")
    p.add_argument(
        "-s",
        "--scenario",
        choices=("sync", "async"),
        default="sync",
        help="sync: one request at a time; async: -nstreams concurrent streams",
    )
    p.add_argument("-t", "--time", type=_seconds, default=10.0, help="seconds to measure (default 10)")
    p.add_argument(
        "-w", "--warmup_time", "--warmup-time", type=_seconds, default=2.0, help="seconds of warm-up before measuring (default 2)"
    )
    p.add_argument(
        "-nstreams",
        "--num_streams",
        "--num-streams",
        type=_positive_int,
        default=None,
        help="concurrent streams in the async scenario (default: max(2, cores // 2))",
    )
    p.add_argument(
        "-e", "--engine", choices=("sparseinfer", "onnxruntime"), default="sparseinfer", help="the runtime to measure (default sparseinfer)"
    )
    p.add_argument(
        "-x",
        "--export_path",
        "--export-path",
        default=None,
        metavar="JSON",
        help="also write the results (and these arguments) to this JSON file",
    )
    p.add_argument(
        "--quantize",
        nargs="?",
        const="int8",
        default=None,
        metavar="int8",
        help="run the matmuls in int8 (dynamic per-row activations, per-channel weights)",
    )
    p.set_defaults(func=cmd_benchmark)

    # ---- analyze
    p = sub.add_parser(
        "analyze",
        parents=[debug],
        help="per-layer time, FLOP rate and weight layouts",
        description="Profile every step of the compiled plan (median of several runs) and show each Dense weight's storage.",
    )
    _add_model_shape_args(p, "no progress messages on stderr")
    p.add_argument(
        "-n", "--num_iterations", "--num-iterations", type=_positive_int, default=10, help="profiled runs; the median is shown (default 10)"
    )
    p.add_argument(
        "-w",
        "--num_warmup_iterations",
        "--num-warmup-iterations",
        type=_non_negative_int,
        default=2,
        help="runs before profiling (default 2)",
    )
    p.add_argument("--json", action="store_true", help="print the analysis as JSON instead of tables")
    p.add_argument("-x", "--export_path", "--export-path", default=None, metavar="JSON", help="also write the analysis to this JSON file")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of the time per step (needs matplotlib)")
    p.set_defaults(func=cmd_analyze)

    # ---- sparsify
    p = sub.add_parser(
        "sparsify",
        parents=[debug],
        help="magnitude-prune a model's encoder weights and/or quantize them to int8, and write the new model",
        description=(
            "Zero the smallest-magnitude encoder weights (or blocks) with --sparsity, then with --quantize int8 quantize the "
            "encoder's linear layers (symmetric int8 weights per output channel, activations quantized per tensor at run time), "
            "and write a new model. Pruning without fine-tuning destroys accuracy: use it for benchmarks and experiments. OUT "
            "ending in .onnx is a file; otherwise a directory that also receives the source directory's tokenizer and config files."
        ),
    )
    p.add_argument("model", help="an .onnx file, or a directory holding model.onnx")
    p.add_argument("--sparsity", type=_fraction, default=None, help="fraction of weights (or blocks) to zero, in [0, 1)")
    p.add_argument("--block", type=parse_block, default=None, metavar="RxC", help="zero whole blocks of the [K, N] weight view, e.g. 4x1")
    p.add_argument("--scope", choices=("per-layer", "global"), default="per-layer", help="rank within each weight or over all of them")
    p.add_argument("--include", action="append", default=None, metavar="REGEX", help="only weights whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX", help="skip weights whose name matches (repeatable)")
    p.add_argument("--heads", action="store_true", help="prune the task head too")
    p.add_argument("--embeddings", action="store_true", help="prune the embedding tables too")
    p.add_argument(
        "--quantize",
        default=None,
        metavar="int8",
        help="then quantize the encoder's linear layers to int8 (ONNX DynamicQuantizeLinear + MatMulInteger; onnxruntime runs it too)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .onnx file to write, or a directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=cmd_sparsify)

    # ---- run
    p = sub.add_parser(
        "run",
        parents=[debug],
        help="run a task pipeline on texts and print JSON",
        description=(
            "Run a task pipeline. Inputs come from the arguments, or from stdin one per line (plain text, or a JSON object "
            'of the task\'s fields, e.g. {"question": ..., "context": ...}). Prints one JSON line per input.'
        ),
    )
    p.add_argument("texts", nargs="*", help="input texts (default: read stdin)")
    p.add_argument(
        "--task", required=True, help="task name or alias: text-classification, token-classification, question-answering, embeddings, …"
    )
    p.add_argument(
        "--model-path", "--model_path", dest="model_path", required=True, help="model directory (model.onnx, tokenizer.json, config.json)"
    )
    p.add_argument("--question", default=None, help="question (question-answering)")
    p.add_argument("--context", default=None, help="context (question-answering)")
    p.add_argument(
        "--kw",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="pipeline option (repeatable; the value is read as JSON when it parses)",
    )
    p.add_argument(
        "-b", "--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=1, help="engine batch size (default 1)"
    )
    p.add_argument(
        "--seq",
        "--sequence-length",
        "--sequence_length",
        dest="sequence_length",
        type=_sequence_lengths,
        default=DEFAULT_SEQUENCE_LENGTH,
        help=f"sequence length, or several (64,128) for length buckets (default {DEFAULT_SEQUENCE_LENGTH})",
    )
    p.add_argument("-ncores", "--num_cores", "--num-cores", type=_positive_int, default=None, help="threads to run on (default: all)")
    p.add_argument("--batch", action="store_true", help="run all plain-text inputs as one call and print one JSON document")
    p.add_argument("--quantize", default=None, metavar="int8", help="run the matmuls in int8")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=cmd_run)

    # ---- serve (the arguments are the server's own; see `sparseinfer serve --help`)
    sub.add_parser(
        "serve",
        add_help=False,
        help="HTTP server (needs the 'server' extra): serve --task T --model-path P [--host] [--port] | --config-file cfg.yaml",
    )
    return parser


# =============================================================================== entry point
_USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, OSError, NotImplementedError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()]
        text = "invalid input: " + "; ".join(parts)
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _split_global(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --debug was given before the command, the arguments with it removed)."""
    debug = False
    rest = list(argv)
    while rest and rest[0] == "--debug":
        debug = True
        rest.pop(0)
    return debug, rest


def main(argv: Sequence[str] | None = None) -> int:
    """The `sparseinfer` command. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, rest = _split_global(argv)
    if rest and rest[0] == "serve":
        return cmd_serve(rest[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:  # --help, --version and usage errors (code 2): return the code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    args.debug = debug or getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sparseinfer run … | head -1`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python's exit-time flush quiet
        return 0
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, _USER_ERRORS):
            print(f"sparseinfer {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(
            f"sparseinfer {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
