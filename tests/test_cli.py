"""The `sparseinfer` command line: benchmark, analyze, sparsify, run, serve and their errors.

Most tests call `main([...])` in-process; a few run `python -m sparseinfer` in a subprocess. The
oracles: JSON fields that must agree with each other (never a speed), the plan the Engine compiles
for the same shapes, `weight_sparsity` and onnxruntime for pruned models, and the Pipeline called
in-process for `run`. Everything runs on one thread (`-ncores 1`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sparseinfer import Engine, Pipeline, weight_sparsity
from sparseinfer.cli import main, parse_block, parse_input_shapes
from tests.tolerances import INT8_FILE_MAX_DIFF_OF_RANGE

FIXTURES = Path(__file__).parent / "fixtures" / "models"
CLS = FIXTURES / "bert-sequence-classification"
TOKEN = FIXTURES / "bert-token-classification"
QA = FIXTURES / "bert-question-answering"
REPO = Path(__file__).resolve().parents[1]

LATENCY_ORDER = ["latency_min_ms", "latency_median_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms"]
SUMMARY_FIELDS = [
    "items_per_sec",
    "latency_mean_ms",
    "latency_median_ms",
    "latency_std_ms",
    "latency_p90_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "iterations",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_benchmark_report(report: dict, engine: str, batch: int, shapes: dict) -> None:
    for key in [*SUMMARY_FIELDS, "latency_min_ms", "latency_max_ms", "items", "batch_size", "elapsed_s", "args", "model_path", "scenario"]:
        assert key in report, key
    assert report["engine"] == engine
    assert report["iterations"] >= 1
    assert report["batch_size"] == batch
    assert report["items"] == report["iterations"] * batch
    assert report["input_shapes"] == shapes
    values = [report[k] for k in LATENCY_ORDER]
    assert values == sorted(values), dict(zip(LATENCY_ORDER, values))
    assert report["latency_min_ms"] <= report["latency_mean_ms"] <= report["latency_max_ms"]
    assert report["latency_std_ms"] >= 0
    assert report["items_per_sec"] > 0
    assert report["elapsed_s"] > 0
    assert report["items_per_sec"] == pytest.approx(report["items"] / report["elapsed_s"])


# ----------------------------------------------------------------------------- argument parsing
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1,128],[1,128],[1,128]", [(1, 128)] * 3),
        ("[[1,128],[1,128]]", [(1, 128)] * 2),
        ("[1, 128], [1, 64]", [(1, 128), (1, 64)]),
        ("1x128", [(1, 128)]),
        ("[4,32]", [(4, 32)]),
        ("input_ids:1x128,attention_mask:[1,128]", {"input_ids": (1, 128), "attention_mask": (1, 128)}),
    ],
)
def test_parse_input_shapes(text, expected):
    assert parse_input_shapes(text) == expected


@pytest.mark.parametrize("text", ["", "[1,x]", "1x", "[1,0]", "foo", "[1,128", "a:", "a:1x2,a:1x2"])
def test_parse_input_shapes_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_input_shapes(text)


def test_parse_block():
    assert parse_block("4x1") == (4, 1)
    assert parse_block("2,8") == (2, 8)
    for bad in ("4", "0x1", "4x", "axb", "4x1x1"):
        with pytest.raises(Exception, match="block"):
            parse_block(bad)


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_sync_writes_consistent_json(capsys, tmp_path):
    out = tmp_path / "results.json"
    code, stdout, err = run_cli(capsys, "benchmark", CLS, "-t", "0.5", "-w", "0.1", "-ncores", "1", "-x", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    shapes = {n: [1, 128] for n in ("input_ids", "attention_mask", "token_type_ids")}
    check_benchmark_report(report, "sparseinfer", 1, shapes)
    assert report["scenario"] == "sync" and report["num_streams"] == 1
    assert report["args"]["time"] == 0.5 and report["args"]["num_cores"] == 1
    # the printed summary carries the same numbers
    assert "Throughput (items/sec)" in stdout and "Latency p99 (ms/batch)" in stdout
    assert f"Iterations: {report['iterations']}" in stdout
    assert "compiling plan for [1, 128]" in err


def test_benchmark_quiet_and_shapes(capsys, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(
        capsys, "benchmark", CLS / "model.onnx", "-shapes", "[2,16],[2,16],[2,16]", "-t", "0.2", "-w", "0", "-ncores", "1", "-q", "-x", out
    )
    assert code == 0, err
    assert err == ""
    report = json.loads(out.read_text())
    check_benchmark_report(report, "sparseinfer", 2, {n: [2, 16] for n in ("input_ids", "attention_mask", "token_type_ids")})
    assert "Batch Size: 2" in stdout


def test_benchmark_batch_and_sequence_flags(capsys, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "benchmark", CLS, "-b", "3", "--seq", "8", "-t", "0.2", "-w", "0", "-ncores", "1", "-q", "-x", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    check_benchmark_report(report, "sparseinfer", 3, {n: [3, 8] for n in ("input_ids", "attention_mask", "token_type_ids")})


def test_benchmark_onnxruntime(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ort.json"
    code, _, err = run_cli(
        capsys,
        "benchmark",
        CLS,
        "-e",
        "onnxruntime",
        "-i",
        "input_ids:1x32,attention_mask:1x32,token_type_ids:1x32",
        "-t",
        "0.3",
        "-w",
        "0.1",
        "-ncores",
        "1",
        "-x",
        out,
    )
    assert code == 0, err
    report = json.loads(out.read_text())
    check_benchmark_report(report, "onnxruntime", 1, {n: [1, 32] for n in ("input_ids", "attention_mask", "token_type_ids")})


def test_benchmark_async_streams(capsys, tmp_path):
    out = tmp_path / "async.json"
    code, stdout, err = run_cli(
        capsys, "benchmark", CLS, "-s", "async", "-nstreams", "2", "--seq", "32", "-t", "0.4", "-w", "0.1", "-ncores", "1", "-x", out
    )
    assert code == 0, err
    report = json.loads(out.read_text())
    check_benchmark_report(report, "sparseinfer", 1, {n: [1, 32] for n in ("input_ids", "attention_mask", "token_type_ids")})
    assert report["scenario"] == "async" and report["num_streams"] == 2
    assert report["threads_per_request"] == 1
    assert "Streams: 2" in stdout


def test_benchmark_subprocess(tmp_path):
    """The real entry point, `python -m sparseinfer`, in a fresh process."""
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "sparseinfer", "benchmark", str(CLS / "model.onnx"), "-t", "1", "-w", "0.2", "-ncores", "1", "-x", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    check_benchmark_report(report, "sparseinfer", 1, {n: [1, 128] for n in ("input_ids", "attention_mask", "token_type_ids")})
    assert "Throughput (items/sec)" in proc.stdout


def test_error_subprocess_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparseinfer", "benchmark", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- analyze
def _plan_steps(model, shape) -> list:
    engine = Engine(model, num_threads=1)
    feeds = {n: np.ones(shape, np.int64) for n in engine.input_names}
    return engine.plan(feeds).steps


def test_analyze_json_has_one_row_per_plan_step(capsys):
    code, stdout, err = run_cli(capsys, "analyze", CLS, "--seq", "32", "-n", "2", "-w", "0", "-ncores", "1", "-q", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    steps = _plan_steps(CLS, (1, 32))
    assert [r["op"] for r in report["layers"]] == [s.node.op for s in steps]
    assert [r["kind"] for r in report["layers"]] == [s.kind for s in steps]
    dense = [r for r in report["layers"] if r["op"] == "Dense"]
    assert dense and all(r["layout"] in ("dense", "csr", "bsr") for r in dense)
    assert all(r["layout"] is None for r in report["layers"] if r["op"] != "Dense")
    assert all(r["ms"] >= 0 for r in report["layers"])
    assert report["layers"][-1]["output_shape"] == [1, 3]  # the classifier's logits
    assert report["total_ms"] == pytest.approx(sum(r["ms"] for r in report["layers"]))
    assert sum(o["count"] for o in report["ops"]) == len(steps)
    assert report["dense_weights"]["count"] == len(dense)


def test_analyze_table_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    code, stdout, err = run_cli(capsys, "analyze", CLS, "--seq", "16", "-n", "1", "-w", "0", "-ncores", "1", "--plot", png)
    assert code == 0, err
    steps = _plan_steps(CLS, (1, 16))
    rows = [line for line in stdout.splitlines() if line[:3].strip().isdigit() and line.split()[0].isdigit()]
    assert len(rows) == len(steps)
    assert all(" dense " in line or " bsr " in line or " csr " in line for line in rows if " Dense " in line)
    assert "compiling plan for [1, 16]" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- sparsify
def test_sparsify_to_directory(capsys, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "sparsify", CLS, "--sparsity", "0.75", "--block", "4x1", "-o", out)
    assert code == 0, err
    model = out / "model.onnx"
    assert model.is_file() and (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.safetensors"))  # the dense weights are not carried along
    rows = weight_sparsity(model, block=(4, 1))
    encoder = [r for r in rows if r["role"] == "encoder"]
    assert encoder and all(r["block_sparsity"] == pytest.approx(0.75, abs=0.02) for r in encoder)
    assert all(r["zeros"] == 0 or r["role"] != "head" for r in rows)
    for r in encoder:  # the table shows each weight's achieved sparsity
        assert f"{r['sparsity']:.1%}" in stdout
    # onnxruntime runs the pruned model
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ids = np.array([[2, 51, 87, 3]], np.int64)
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    assert logits.shape == (1, 3) and np.isfinite(logits).all()
    # and the analysis shows the sparse weights
    code, stdout, err = run_cli(capsys, "analyze", out, "--seq", "16", "-n", "1", "-w", "0", "-ncores", "1", "-q", "--json")
    assert code == 0, err
    dense = [r for r in json.loads(stdout)["layers"] if r["op"] == "Dense" and r["sparsity"] and r["sparsity"] > 0.5]
    assert dense and all(r["layout"] for r in dense)


def test_sparsify_to_file_global(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "sparsify", CLS / "model.onnx", "--sparsity", "0.5", "--scope", "global", "-o", out, "-q")
    assert code == 0, err
    encoder = [r for r in weight_sparsity(out) if r["role"] == "encoder"]
    zeros, size = sum(r["zeros"] for r in encoder), sum(r["size"] for r in encoder)
    assert zeros / size == pytest.approx(0.5, abs=0.01)


def test_sparsify_then_quantize(capsys, tmp_path):
    out = tmp_path / "pruned-int8"
    code, stdout, err = run_cli(capsys, "sparsify", CLS, "--sparsity", "0.5", "--block", "4x1", "--quantize", "int8", "-o", out)
    assert code == 0, err
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 12 and ops.count("DynamicQuantizeLinear") == 8  # the encoder; the head stays fp32
    for mm in (n for n in model.graph.node if n.op_type == "MatMulInteger"):  # pruned first, then quantized: the zeros stay
        blocks = inits[mm.input[1]].reshape(-1, 4, inits[mm.input[1]].shape[1])
        assert (~blocks.any(axis=1)).mean() >= 0.5
    assert (out / "tokenizer.json").is_file()
    assert "int8: 12 linear weights" in stdout and stdout.count(" int8") >= 12 and "50.0%" in stdout
    # onnxruntime runs it, and so does the engine, on the int8 kernel
    ort = pytest.importorskip("onnxruntime")
    ids = np.array([[2, 51, 87, 3, 9, 14]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    (theirs,) = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    engine = Engine(out)
    (ours,) = engine.run(feeds)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=INT8_FILE_MAX_DIFF_OF_RANGE * (theirs.max() - theirs.min()))
    assert sum(1 for r in engine.profile(feeds) if r["op"] == "QDense" and r["kind"] == "kernel") == 12 - 4  # Q, K, V merged


def test_quantize_only(capsys, tmp_path):
    out = tmp_path / "int8.onnx"
    code, stdout, err = run_cli(capsys, "sparsify", CLS, "--quantize", "int8", "-o", out, "-q")
    assert code == 0 and not err, err
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("MatMulInteger") == 12
    assert "encoder 0.0%" in stdout  # nothing pruned


# ----------------------------------------------------------------------------- run
def _lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_run_text_classification_matches_pipeline(capsys):
    texts = ["I loved it", "Not again, never."]
    code, stdout, err = run_cli(
        capsys, "run", "--task", "sentiment-analysis", "--model-path", CLS, "-ncores", "1", "--kw", "top_k=2", *texts
    )
    assert code == 0, err
    pipe = Pipeline.create("sentiment-analysis", CLS, num_threads=1, top_k=2)
    assert _lines(stdout) == [pipe(t).model_dump() for t in texts]


def test_run_batch_and_stdin(capsys, monkeypatch):
    texts = ["first text", "the second one"]
    pipe = Pipeline.create("text-classification", CLS, num_threads=1)
    code, stdout, err = run_cli(
        capsys, "run", "--task", "text-classification", "--model-path", CLS, "-ncores", "1", "-q", "--batch", *texts
    )
    assert code == 0, err
    assert _lines(stdout) == [pipe(texts).model_dump()]
    monkeypatch.setattr(sys, "stdin", io.StringIO("first text\n\n" + json.dumps({"sequences": [["a", "b"]]}) + "\n"))
    code, stdout, err = run_cli(capsys, "run", "--task", "text-classification", "--model-path", CLS, "-ncores", "1", "-q")
    assert code == 0, err
    assert _lines(stdout) == [pipe("first text").model_dump(), pipe(sequences=[["a", "b"]]).model_dump()]


def test_run_token_classification(capsys):
    text = "Anna works at Acme in Berlin."
    code, stdout, err = run_cli(
        capsys, "run", "--task", "ner", "--model-path", TOKEN, "-ncores", "1", "-q", "--kw", "aggregation_strategy=simple", text
    )
    assert code == 0, err
    pipe = Pipeline.create("ner", TOKEN, num_threads=1, aggregation_strategy="simple")
    assert _lines(stdout) == [pipe(text).model_dump()]


def test_run_question_answering(capsys, monkeypatch):
    q, c = "Where is the café?", "The café is in Zürich, near the lake."
    pipe = Pipeline.create("qa", QA, num_threads=1)
    code, stdout, err = run_cli(capsys, "run", "--task", "qa", "--model-path", QA, "-ncores", "1", "-q", "--question", q, "--context", c)
    assert code == 0, err
    assert _lines(stdout) == [pipe(question=q, context=c).model_dump()]
    assert "Zürich" in stdout or "\\u" not in stdout  # JSON keeps non-ASCII text readable
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"question": q, "context": c, "top_k": 2}) + "\n"))
    code, stdout, err = run_cli(capsys, "run", "--task", "question-answering", "--model-path", QA, "-ncores", "1", "-q")
    assert code == 0, err
    assert _lines(stdout) == [[a.model_dump() for a in pipe(question=q, context=c, top_k=2)]]


def test_run_embeddings(capsys):
    code, stdout, err = run_cli(
        capsys,
        "run",
        "--task",
        "embeddings",
        "--model-path",
        CLS,
        "-ncores",
        "1",
        "-q",
        "--seq",
        "16,32",
        "--kw",
        "normalize=true",
        "a sentence",
    )
    assert code == 0, err
    pipe = Pipeline.create("embeddings", CLS, num_threads=1, sequence_length=[16, 32], normalize=True)
    (got,) = _lines(stdout)
    np.testing.assert_allclose(got["embeddings"], pipe("a sentence").embeddings, rtol=1e-6, atol=1e-7)
    assert np.linalg.norm(got["embeddings"][0]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- serve
def test_serve_delegates_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("sparseinfer.server")
    fake.cli_main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparseinfer.server", fake)
    assert main(["serve", "--task", "qa", "--model-path", "m", "--port", "5555"]) == 0
    assert seen == [["--task", "qa", "--model-path", "m", "--port", "5555"]]


@pytest.mark.parametrize("missing", ["sparseinfer.server", "fastapi"])
def test_serve_without_extras(capsys, monkeypatch, missing):
    if missing == "fastapi":
        fake = types.ModuleType("sparseinfer.server")

        def cli_main(argv):
            import fastapi  # noqa: F401  (made unimportable below)

        fake.cli_main = cli_main
        monkeypatch.setitem(sys.modules, "sparseinfer.server", fake)
    monkeypatch.setitem(sys.modules, missing, None)  # `import` of it now fails
    code, _, err = run_cli(capsys, "serve", "--task", "qa", "--model-path", "m")
    assert code == 2
    assert "pip install 'sparseinfer[server]'" in err


# ----------------------------------------------------------------------------- errors for people
@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmark", "no/such/model.onnx"], "does not exist"),
        (["benchmark", str(FIXTURES)], "has no model.onnx"),
        (["benchmark", str(CLS), "-i", "[1,x]"], "not a positive integer"),
        (["benchmark", str(CLS), "-i", "[1,128],[1,128]"], "lists 2 shapes"),
        (["benchmark", str(CLS), "-i", "ids:1x8"], "not inputs of the model"),
        (["benchmark", str(CLS), "-b", "2", "-i", "[1,8]"], "conflicts"),
        (["benchmark", str(CLS), "-s", "elastic"], "invalid choice"),
        (["benchmark", str(CLS), "-t", "-1"], "non-negative"),
        (["benchmark", str(CLS), "--quantize", "int4"], "the only quantization is int8"),
        (["benchmark", str(CLS), "--quantize", "-e", "onnxruntime"], "applies to -e sparseinfer"),
        (["sparsify", str(CLS), "--sparsity", "1.5", "-o", "x.onnx"], "must be in [0, 1)"),
        (["sparsify", str(CLS), "--sparsity", "-0.1", "-o", "x.onnx"], "must be in [0, 1)"),
        (["sparsify", str(CLS), "--sparsity", "0.5", "--block", "4", "-o", "x.onnx"], "block must be"),
        (["sparsify", str(CLS), "--sparsity", "0.5", "--block", "3x1", "-o", "x.onnx"], "does not tile"),
        (["sparsify", str(CLS), "-o", "x.onnx"], "nothing to do"),
        (["sparsify", str(CLS), "--quantize", "int4", "-o", "x.onnx"], "the only quantization is int8"),
        (["sparsify", str(CLS), "--quantize", "int8", "--block", "4x1", "-o", "x.onnx"], "--block only apply to pruning"),
        (["sparsify", str(CLS), "--quantize", "int8", "-o", str(CLS / "model.onnx")], "overwrite the source"),
        (["sparsify", str(CLS), "--sparsity", "0.5", "-o", str(CLS / "model.onnx")], "overwrite the source"),
        (["run", "--task", "nope", "--model-path", str(CLS), "x"], "unknown task"),
        (["run", "--task", "qa", "--model-path", str(QA), "plain text"], "--question"),
        (["run", "--task", "glue", "--model-path", str(CLS), "--question", "q", "--context", "c"], "question-answering task"),
        (["run", "--task", "glue", "--model-path", str(CLS), "--kw", "nosuch=1", "x"], "unknown option"),
        (["run", "--task", "glue", "--model-path", str(CLS), "--kw", "top_k", "x"], "key=value"),
        (["run", "--task", "glue", "--model-path", "no/such/dir", "x"], "does not exist"),
        (["run", "--task", "glue", "--model-path", str(CLS), "   "], "must not be empty"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code = main([*argv, "-q"])
    _, err = capsys.readouterr()
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert message in last, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx"))


def test_argparse_errors_exit_2(capsys):
    assert main(["benchmark"]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: model" in err and err.count("\n") == 1
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("benchmark", "analyze", "sparsify", "run", "serve"))


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "benchmark", "no/such/model.onnx"])
    with pytest.raises(Exception, match="does not exist"):
        main(["benchmark", "no/such/model.onnx", "--debug"])


def test_run_without_input(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run_cli(capsys, "run", "--task", "glue", "--model-path", CLS, "-q")
    assert code == 2 and "no input" in err
