"""Server configuration: DeepSparse-style YAML files, defaults, and the errors for bad ones; the
`serve` command-line flags."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from sparseinfer.server import DEFAULT_HOST, DEFAULT_PORT, ConfigError, ServerConfig, cli_main, config_from_args, load_config, serve_parser
from sparseinfer.server.config import ConfigWarning, InputShapesConfig, SequenceLengthsConfig, available_cores
from tests.conftest import FIXTURES

pytest.importorskip("yaml")

CLF = FIXTURES / "bert-sequence-classification"
QA = FIXTURES / "bert-question-answering"
NER = FIXTURES / "bert-token-classification"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> ServerConfig:
    return load_config(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


# --------------------------------------------------------------------------- parsing
def test_deepsparse_style_file(tmp_path):
    config = load(
        tmp_path,
        f"""
num_cores: 1
num_workers: 2
endpoints:
  - task: question_answering
    route: /unpruned/predict
    model: {QA}
    name: question_answering_pipeline_1
    batch_size: 2
    bucketing:
      sequence_lengths: [64, 32, 128]
    kwargs:
      doc_stride: 16
  - task: sentiment-analysis
    route: sentiment/predict/
    model: {CLF}
    bucketing:
      input_shapes: [[1, 64]]
  - task: NER
    model: {NER}
""",
    )
    assert (config.num_cores, config.num_workers, config.workers) == (1, 2, 2)
    qa, clf, ner = config.endpoints
    assert (qa.task, qa.name, qa.route, qa.model, qa.batch_size) == (
        "question-answering",
        "question_answering_pipeline_1",
        "/unpruned/predict",
        str(QA),
        2,
    )
    assert isinstance(qa.bucketing, SequenceLengthsConfig)
    assert qa.pipeline_kwargs(config.num_cores) == {"doc_stride": 16, "batch_size": 2, "sequence_length": [32, 64, 128], "num_threads": 1}
    # Task aliases become the canonical name; routes get their leading slash and lose a trailing one.
    assert (clf.task, clf.name, clf.route) == ("text-classification", "text-classification-0", "/sentiment/predict")
    assert isinstance(clf.bucketing, InputShapesConfig)
    assert clf.pipeline_kwargs() == {"batch_size": 1, "sequence_length": 64}
    assert (ner.task, ner.name, ner.route, ner.bucketing) == ("token-classification", "token-classification-0", None, None)


def test_defaults(tmp_path):
    config = load(tmp_path, f"endpoints:\n  - task: qa\n    model: {QA}\n")
    assert config.num_cores is None and config.num_workers is None
    assert config.threads_per_call == available_cores()
    assert config.workers == 1  # every call uses all the cores: one at a time
    (e,) = config.endpoints
    assert (e.name, e.route, e.batch_size, e.bucketing, e.kwargs) == ("question-answering-0", None, 1, None, {})
    assert e.pipeline_kwargs(config.num_cores) == {"batch_size": 1}
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 5543)


def test_default_workers_split_the_cores(tmp_path):
    config = load(tmp_path, f"num_cores: 1\nendpoints:\n  - task: qa\n    model: {QA}\n")
    assert config.workers == available_cores()


def test_default_names_count_per_task_and_skip_taken_names(tmp_path):
    config = load(
        tmp_path,
        f"""
endpoints:
  - {{task: qa, model: {QA}, route: /a}}
  - {{task: qa, model: {QA}, route: /b, name: question-answering-0}}
  - {{task: sentiment-analysis, model: {CLF}}}
  - {{task: qa, model: {QA}}}
""",
    )
    assert [e.name for e in config.endpoints] == [
        "question-answering-1",
        "question-answering-0",
        "text-classification-0",
        "question-answering-2",
    ]


def test_model_path_key_and_kwargs_sequence_length(tmp_path):
    config = load(tmp_path, f"endpoints:\n  - task: qa\n    model_path: {QA}\n    kwargs: {{sequence_length: 64}}\n")
    assert config.endpoints[0].model == str(QA)
    assert config.endpoints[0].pipeline_kwargs()["sequence_length"] == 64


def test_deepsparse_only_keys_are_accepted_with_a_warning(tmp_path):
    text = f"""
num_cores: 1
engine_thread_pinning: core
pytorch_num_threads: 1
loggers: {{}}
integration: local
endpoints:
  - task: qa
    model: {QA}
    data_logging: {{}}
"""
    with pytest.warns(ConfigWarning) as record:
        load(tmp_path, text)
    messages = " ".join(str(w.message) for w in record)
    assert "engine_thread_pinning" in messages and "loggers" in messages and "data_logging" in messages


def test_onnx_file_as_model(tmp_path):
    config = load(tmp_path, f"endpoints:\n  - task: qa\n    model: {QA / 'model.onnx'}\n")
    assert config.endpoints[0].model.endswith("model.onnx")


def test_for_task_builds_one_endpoint():
    config = ServerConfig.for_task(
        "sentiment-analysis", str(CLF), sequence_length=[64, 32], num_cores=1, route="/s", kwargs={"top_k": None}
    )
    (e,) = config.endpoints
    assert (e.task, e.name, e.route) == ("text-classification", "text-classification-0", "/s")
    assert e.pipeline_kwargs(config.num_cores) == {"top_k": None, "batch_size": 1, "sequence_length": [32, 64], "num_threads": 1}


# --------------------------------------------------------------------------- errors
def test_unknown_task(tmp_path):
    msg = error(tmp_path, f"endpoints:\n  - task: translation\n    model: {QA}\n")
    assert "endpoints.0.task" in msg and "unknown task 'translation'" in msg and "question-answering (aliases: qa)" in msg
    assert "server.yaml" in msg


def test_missing_model(tmp_path):
    msg = error(tmp_path, "endpoints:\n  - task: qa\n")
    assert "endpoints.0" in msg and "no model given" in msg


def test_model_that_does_not_exist(tmp_path):
    msg = error(tmp_path, f"endpoints:\n  - task: qa\n    model: {tmp_path / 'nowhere'}\n")
    assert "endpoints.0.model" in msg and "does not exist" in msg


def test_model_directory_without_model_onnx(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = error(tmp_path, f"endpoints:\n  - task: qa\n    model: {tmp_path / 'empty'}\n")
    assert "has no model.onnx" in msg


def test_sparsezoo_stub_is_refused(tmp_path):
    msg = error(tmp_path, "endpoints:\n  - task: qa\n    model: zoo:nlp/question_answering/bert-base/pytorch/huggingface/squad/base-none\n")
    assert "SparseZoo" in msg and "not supported" in msg


def test_duplicate_names(tmp_path):
    msg = error(tmp_path, f"endpoints:\n  - {{task: qa, model: {QA}, name: m}}\n  - {{task: ner, model: {NER}, name: m}}\n")
    assert "endpoints:" in msg and "names must be unique" in msg and "'m'" in msg


def test_duplicate_routes(tmp_path):
    msg = error(tmp_path, f"endpoints:\n  - {{task: qa, model: {QA}, route: /x}}\n  - {{task: ner, model: {NER}, route: x/}}\n")
    assert "routes must be unique" in msg and "'/x'" in msg


@pytest.mark.parametrize("route", ["/v2/models/qa/infer", "/docs", "/openapi.json", "/a b"])
def test_reserved_or_malformed_route(tmp_path, route):
    msg = error(tmp_path, f"endpoints:\n  - task: qa\n    model: {QA}\n    route: '{route}'\n")
    assert "endpoints.0.route" in msg


def test_bad_name(tmp_path):
    msg = error(tmp_path, f"endpoints:\n  - task: qa\n    model: {QA}\n    name: a/b\n")
    assert "endpoints.0.name" in msg


@pytest.mark.parametrize(
    ("bucketing", "reason"),
    [
        ("{sizes: [64]}", "bucketing must hold one of"),
        ("{sequence_lengths: [64], input_shapes: [[1, 64]]}", "bucketing must hold one of"),
        ("{sequence_lengths: []}", "at least 1 item"),
        ("{sequence_lengths: [0, 64]}", "positive"),
        ("{input_shapes: [[1, 2, 64]]}", "[batch, sequence]"),
        ("{input_shapes: [[4, 64]]}", "batch sizes [4]"),
    ],
)
def test_bad_bucketing(tmp_path, bucketing, reason):
    msg = error(tmp_path, f"endpoints:\n  - task: qa\n    model: {QA}\n    bucketing: {bucketing}\n")
    assert reason in msg and "endpoints.0" in msg


def test_bucketing_and_kwargs_sequence_length_conflict(tmp_path):
    msg = error(
        tmp_path,
        f"endpoints:\n  - task: qa\n    model: {QA}\n    bucketing: {{sequence_lengths: [64]}}\n    kwargs: {{sequence_length: 32}}\n",
    )
    assert "not both" in msg


def test_misspelt_keys_are_errors(tmp_path):
    msg = error(tmp_path, f"num_core: 1\nendpoints:\n  - task: qa\n    model: {QA}\n    batchsize: 2\n")
    assert "num_core: unknown key" in msg and "endpoints.0.batchsize: unknown key" in msg


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ("endpoints: [\n", "not valid YAML"),
        ("- task: qa\n", "must be a mapping"),
        ("endpoints: []\n", "at least 1 item"),
        ("num_cores: 0\nendpoints: []\n", "num_cores"),
        ("num_cores: 4096\nendpoints: []\n", "threads Numba was started with"),
        ("integration: sagemaker\nendpoints: []\n", "'local' layout only"),
    ],
)
def test_bad_files(tmp_path, text, reason):
    assert reason in error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- command-line flags
def parse(argv: list[str]) -> ServerConfig:
    parser = serve_parser()
    return config_from_args(parser.parse_args(argv), parser)


def test_flags_for_one_endpoint():
    config = parse(
        ["--task", "qa", "--model-path", str(QA), "--sequence-length", "64", "128", "--num-cores", "1", "--kwargs", '{"doc_stride": 16}']
    )
    (e,) = config.endpoints
    assert e.pipeline_kwargs(config.num_cores) == {"doc_stride": 16, "batch_size": 1, "sequence_length": [64, 128], "num_threads": 1}
    # DeepSparse's spellings work too.
    assert parse(["--task", "qa", "--model_path", str(QA), "--batch_size", "2"]).endpoints[0].batch_size == 2


def test_config_file_flag_with_overrides(tmp_path):
    path = write(tmp_path, f"num_cores: 1\nendpoints:\n  - {{task: qa, model: {QA}, name: q, route: /q}}\n")
    config = parse(["--config-file", str(path), "--num-workers", "1"])
    assert (config.num_cores, config.num_workers, config.endpoints[0].name, config.endpoints[0].route) == (1, 1, "q", "/q")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--task", "qa", "--config-file", "x.yaml"],
        ["--config-file", "x.yaml", "--model-path", "m"],
        ["--task", "qa", "--model-path", "m", "--kwargs", "[1]"],
    ],
)
def test_conflicting_or_missing_flags_exit(argv, capsys):
    parser = serve_parser()
    with pytest.raises(SystemExit) as info:
        config_from_args(parser.parse_args(argv), parser)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_main_reports_a_bad_config_and_returns_2(tmp_path, capsys):
    path = write(tmp_path, "endpoints:\n  - task: translation\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli_main(["serve", "--config-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "endpoints.0.task: unknown task 'translation'" in err


def test_cli_main_reports_a_missing_model_and_returns_2(capsys):
    assert cli_main(["--task", "qa", "--model-path", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_main_binds_loopback_by_default(monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    assert cli_main(["serve", "--task", "qa", "--model-path", str(QA), "--num-cores", "1", "--log-level", "warning"]) == 0
    ((app, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 5543)
    assert [e.name for e in app.state.endpoints] == ["question-answering-0"]
    for e in app.state.endpoints:
        e.close()
