"""The Pipeline base: task registry, sequence-length buckets and batch chunks, stage timings, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from sparseinfer.tasks import TASKS, Pipeline, TaskRegistry, TextClassificationInput, normalize_task, register_task
from sparseinfer.tasks.embeddings import EmbeddingsPipeline
from sparseinfer.tasks.text_classification import TextClassificationPipeline, class_scores
from tests.conftest import FIXTURES

BERT = FIXTURES / "bert-sequence-classification"
ROBERTA = FIXTURES / "roberta-sequence-classification"
DISTILBERT = FIXTURES / "distilbert-sequence-classification"

SHORT = "Good."
LONG = "Electroencephalography measures the electrical activity of the brain through the scalp."  # 40 tokens with bert


def classifier(path=BERT, **kwargs) -> TextClassificationPipeline:
    kwargs.setdefault("num_threads", 1)
    return Pipeline.create("text-classification", path, **kwargs)


class Spy:
    """Wraps engine.mapped_run to record the feeds of every run."""

    def __init__(self, pipe: Pipeline) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        run = pipe.engine.mapped_run

        def spy(feeds):
            self.calls.append({k: v.copy() for k, v in feeds.items()})
            return run(feeds)

        pipe.engine.mapped_run = spy


# --------------------------------------------------------------------------- registry
ALIASES = {
    "text-classification": ["text-classification", "sentiment-analysis", "glue"],
    "embeddings": ["embeddings", "feature-extraction", "sentence-embeddings"],
    "question-answering": ["question-answering", "qa"],
    "token-classification": ["token-classification", "ner"],
}


@pytest.mark.parametrize("task", sorted(ALIASES))
def test_registry_knows_every_task_and_alias(task):
    classes = {TASKS.lookup(name) for name in ALIASES[task]}
    assert len(classes) == 1 and next(iter(classes)).task == task
    assert task in TASKS.tasks()


def test_names_match_case_insensitively_with_dash_and_underscore_equal():
    assert normalize_task("  Sentiment_Analysis ") == "sentiment-analysis"
    for name in ("SENTIMENT_ANALYSIS", "Text_Classification", "text-classification", "GLUE"):
        assert TASKS.lookup(name) is TextClassificationPipeline
    for name in ("Feature_Extraction", "sentence_embeddings", "EMBEDDINGS"):
        assert TASKS.lookup(name) is EmbeddingsPipeline
    assert "Sentiment_Analysis" in TASKS
    assert isinstance(Pipeline.create("Sentiment_Analysis", BERT, num_threads=1), TextClassificationPipeline)


def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="unknown task 'summarization'.*text-classification.*sentiment-analysis") as err:
        Pipeline.create("summarization", BERT)
    assert "embeddings" in str(err.value)


def test_duplicates_are_rejected():
    class Clash(Pipeline):
        task = "my-task"
        aliases = ("Sentiment_Analysis",)  # an alias of text classification, spelled differently

    with pytest.raises(ValueError, match="already registered: 'sentiment-analysis'.*TextClassificationPipeline"):
        register_task(Clash)
    assert "my-task" not in TASKS  # nothing was registered by the failed attempt

    registry = TaskRegistry()

    class A(Pipeline):
        task = "a-task"
        aliases = ("a",)

    class B(Pipeline):
        task = "A_Task"

    class Repeats(Pipeline):
        task = "r"
        aliases = ("R",)

    class Nameless(Pipeline):
        pass

    assert registry.register(A) is A
    assert registry.register(A) is A  # the same class again is harmless
    with pytest.raises(ValueError, match="already registered: 'a-task'"):
        registry.register(B)
    with pytest.raises(ValueError, match="repeat a name"):
        registry.register(Repeats)
    with pytest.raises(TypeError, match="must set the class attribute `task`"):
        registry.register(Nameless)
    assert registry.tasks() == {"a-task": ("a",)}


# --------------------------------------------------------------------------- buckets and chunks
def test_bucket_for_picks_the_smallest_fitting_else_the_largest():
    pipe = classifier(sequence_length=[64, 16, 32, 32])
    assert pipe.sequence_lengths == [16, 32, 64]
    assert [pipe.bucket_for(n) for n in (1, 16, 17, 32, 33, 64, 65, 500)] == [16, 16, 32, 32, 64, 64, 64, 64]
    assert classifier(sequence_length=128).sequence_lengths == [128]


def test_each_chunk_runs_in_its_own_bucket_and_results_do_not_depend_on_it():
    texts = [SHORT, LONG, SHORT, SHORT, "terrible"]
    pipe = classifier(sequence_length=[16, 32, 64], batch_size=2, top_k=None)
    spy = Spy(pipe)
    out = pipe(texts)
    # chunks [SHORT, LONG] → 64, [SHORT, SHORT] → 16, [terrible] + a filler row → 16
    assert [c["input_ids"].shape for c in spy.calls] == [(2, 64), (2, 16), (2, 16)]
    last = spy.calls[-1]
    assert np.array_equal(last["input_ids"][1], last["input_ids"][0])  # the filler copies the first row
    assert (spy.calls[1]["attention_mask"][:, 5:] == 0).all() and (spy.calls[1]["input_ids"][:, 5:] == pipe.pad_token_id).all()
    single = classifier(sequence_length=128, top_k=None)
    ref = single(texts)
    assert out.labels == ref.labels
    np.testing.assert_allclose(out.scores, ref.scores, atol=1e-5)


def test_truncates_to_the_largest_bucket_with_a_warning():
    pipe = classifier(sequence_length=[8, 16])
    spy = Spy(pipe)
    with pytest.warns(UserWarning, match="1 input.*truncated to it.*inputs \\[1\\]"):
        pipe([SHORT, LONG])
    assert [c["input_ids"].shape for c in spy.calls] == [(1, 8), (1, 16)]
    ids = spy.calls[1]["input_ids"][0]
    assert ids[-1] == pipe.tokenizer.token_to_id("[SEP]")  # truncated with special tokens kept
    with pytest.warns(UserWarning):
        encodings, flags = pipe.encode_fitting([SHORT, LONG])
    assert flags == [False, True] and [len(e.ids) for e in encodings] == [5, 16]


def test_run_engine_passes_only_declared_inputs_and_pads_with_the_pad_id():
    for path, pad, with_types in ((ROBERTA, 1, False), (DISTILBERT, 0, False), (BERT, 0, True)):
        pipe = classifier(path, sequence_length=[16, 32])
        spy = Spy(pipe)
        pipe(SHORT)
        feeds = spy.calls[0]
        assert ("token_type_ids" in feeds) is with_types
        assert set(feeds) == set(pipe.engine.input_names)
        assert pipe.pad_token_id == pad and feeds["input_ids"][0, -1] == pad


def test_run_engine_rows_and_sequence_outputs():
    texts = [SHORT, LONG, SHORT, "terrible"]
    pipe = classifier(sequence_length=[16, 64], batch_size=3, top_k=None)
    spy = Spy(pipe)
    encodings = pipe.encode(texts)
    feeds = pipe.feeds_from_encodings(encodings, length=48)  # not a bucket: padded to 64, or cut to 16
    del feeds["token_type_ids"]  # zero-filled when the model wants it
    out = pipe.run_engine(feeds)
    assert [c["input_ids"].shape for c in spy.calls] == [(3, 64), (3, 16)]
    assert out["logits"].shape == (4, 3)
    np.testing.assert_allclose(-np.sort(-class_scores(out["logits"], "softmax")), pipe(texts).scores, atol=1e-5)  # best first
    with pytest.raises(ValueError, match="more than the largest sequence_length 64"):
        pipe.run_engine(pipe.feeds_from_encodings(pipe.encode([LONG + " " + LONG]), length=80))
    with pytest.raises(ValueError, match="does not fit length 8"):
        pipe.feeds_from_encodings(encodings, length=8)
    emb = Pipeline.create("embeddings", BERT, sequence_length=[16, 64], batch_size=2, num_threads=1)
    feeds = emb.feeds_from_encodings(emb.encode([SHORT, SHORT, LONG]), length=64)
    hidden = emb.run_engine(feeds)[emb.hidden_output]
    assert hidden.shape == (3, 64, 32)  # the first chunk ran at 16 and was padded back to 64
    assert (hidden[:2, 16:] == 0).all() and not (hidden[2, 16:40] == 0).all()


def test_model_path_may_be_an_onnx_file_beside_the_config():
    by_dir = classifier(top_k=None)(LONG)
    by_file = classifier(BERT / "model-opset14.onnx", top_k=None)(LONG)
    assert by_file.labels == by_dir.labels
    np.testing.assert_allclose(by_file.scores, by_dir.scores, atol=1e-5)


def test_warmup_and_default_threads():
    pipe = Pipeline.create("text-classification", BERT, sequence_length=[16, 32])
    pipe.warmup()
    assert pipe(SHORT).labels == classifier()(SHORT).labels
    assert "sequence_length=[16, 32]" in repr(pipe)


# --------------------------------------------------------------------------- stages
def test_stage_timings_of_the_last_call():
    pipe = classifier()
    assert pipe.timings == {}
    pipe([SHORT, LONG])
    t = pipe.timings
    assert list(t) == ["parse", "tokenize", "engine", "postprocess", "total"]
    assert all(v >= 0 for v in t.values())
    assert t["total"] >= t["parse"] + t["tokenize"] + t["engine"] + t["postprocess"] - 1e-9


def test_parse_accepts_the_schema_keywords_and_positionals():
    pipe = classifier()
    assert pipe.parse(SHORT) == pipe.parse(sequences=SHORT) == TextClassificationInput(sequences=SHORT)
    given = TextClassificationInput(sequences=[SHORT, LONG])
    assert pipe.parse(given) is given
    assert pipe(given).labels == pipe(sequences=[SHORT, LONG]).labels


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("",), {}, "must not be empty"),
        (("   ",), {}, "must not be empty"),
        (([SHORT, ""],), {}, "must not be empty"),
        (([],), {}, "at least 1 item"),
        ((), {}, "sequences\n  Field required"),
        ((123,), {}, "sequences"),
        (([SHORT, 4],), {}, "sequences"),
        (([[SHORT, SHORT, SHORT]],), {}, "at most 2 items"),
        ((), {"sequence": SHORT}, "Field required"),
        ((SHORT,), {"top_k": 2}, "Extra inputs are not permitted"),
    ],
)
def test_bad_inputs_are_validation_errors(args, kwargs, message):
    with pytest.raises(ValidationError, match=message) as err:
        classifier()(*args, **kwargs)
    assert isinstance(err.value, ValueError)


def test_bad_calls_are_type_errors():
    pipe = classifier()
    with pytest.raises(TypeError, match="at most 1 positional"):
        pipe(SHORT, SHORT)
    with pytest.raises(TypeError, match="both positionally and by keyword"):
        pipe(SHORT, sequences=SHORT)


def test_embeddings_inputs_are_validated():
    pipe = Pipeline.create("embeddings", BERT, num_threads=1)
    with pytest.raises(ValidationError, match="must not be empty"):
        pipe("")
    with pytest.raises(ValidationError, match="inputs"):
        pipe(inputs=None)
    with pytest.raises(ValidationError, match="Field required"):
        pipe(sequences=SHORT)


def copy_model(tmp_path: Path, *drop: str) -> Path:
    d = tmp_path / "model"
    shutil.copytree(BERT, d)
    for name in drop:
        (d / name).unlink()
    return d


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json", "model.onnx"])
def test_missing_model_files_are_named(tmp_path, missing):
    d = copy_model(tmp_path, missing)
    with pytest.raises(FileNotFoundError, match=f"has no {missing}.*model.onnx, tokenizer.json and config.json"):
        classifier(d)


def test_other_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        classifier(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither a directory nor an .onnx file"):
        classifier(BERT / "config.json")
    d = copy_model(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        classifier(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="no id2label"):
        classifier(d)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        classifier(d)


def test_no_model_path():
    # embeddings has a default model (tests/tasks/test_default_model.py); the others explain what to pass
    for task in ("text-classification", "question-answering", "token-classification"):
        with pytest.raises(ValueError, match="no default model yet"):
            Pipeline.create(task)


def test_quantize_option():
    assert classifier(quantize=None).quantize is None
    assert classifier(quantize="int8").engine.pass_config["quantize"] == "int8"
    with pytest.raises(ValueError, match="quantize must be None"):
        classifier(quantize="int4")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sequence_length": 0}, ValueError, "sequence_length must be"),
        ({"sequence_length": []}, ValueError, "sequence_length must be"),
        ({"sequence_length": "128"}, ValueError, "sequence_length must be"),
        ({"sequence_length": [16, 256]}, ValueError, "exceeds the 128 tokens this model takes"),
        ({"batch_size": 0}, ValueError, "batch_size must be"),
        ({"top_k": 0}, ValueError, "top_k must be"),
        ({"function_to_apply": "tanh"}, ValueError, "function_to_apply"),
        ({"pooling": "mean"}, TypeError, "unknown option.*pooling"),
    ],
)
def test_bad_options_are_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        classifier(**kwargs)


def test_roberta_position_limit():
    # max_position_embeddings 130 holds 128 tokens after RoBERTa's pad_token_id + 1 offset
    assert classifier(ROBERTA, sequence_length=128).max_model_length == 128


def test_a_subclass_gets_the_default_parse():
    class EchoInput(BaseModel):
        text: str
        extra: int = 0

    class Echo(Pipeline):
        task = "echo"
        input_schema = EchoInput

    echo = Echo(BERT)
    assert echo.parse("x", 3) == EchoInput(text="x", extra=3)
    assert echo.parse("x", extra=2) == EchoInput(text="x", extra=2)
    with pytest.raises(NotImplementedError):
        echo("x")
