"""Build an ONNX model from a Hugging Face checkpoint directory, without torch.

`from_huggingface("path/to/checkpoint")` reads `config.json` and the `.safetensors` weights and
writes the encoder out op by op with `onnx.helper`, in the form `torch.onnx.export` gives it
(Gather embeddings, MatMul + Add projections, the head split Reshape/Transpose, Q·Kᵀ / sqrt(d) plus
an additive mask (1 - mask) · float32_min, Softmax, erf GELU, LayerNormalization from opset 17 or
its ReduceMean decomposition below), so sparseinfer's fusion passes turn every layer into Dense,
Attention and LayerNormalization nodes exactly as they do for an exported file.

Supported `model_type`s: bert, distilbert, roberta. Tasks (picked from the config's
`architectures` when `task` is None):

| task | outputs | heads read |
|---|---|---|
| feature-extraction | last_hidden_state [batch, sequence, hidden] | none (any checkpoint) |
| sequence-classification | logits [batch, labels] | BERT pooler + classifier; DistilBERT pre_classifier + classifier; RoBERTa classifier.dense + out_proj |
| token-classification | logits [batch, sequence, labels] | classifier |
| question-answering | start_logits, end_logits [batch, sequence] | qa_outputs |

Inputs are `input_ids`, `attention_mask` and, for bert only, `token_type_ids`: int64
[batch, sequence], both dims open. Weights are stored as float32 under their checkpoint names;
the initializers of MatMul weights hold the transpose ([in, out]) of the checkpoint's [out, in].
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .safetensors import SafetensorsError, load_safetensors

__all__ = ["SUPPORTED_MODEL_TYPES", "TASKS", "ExportError", "from_huggingface"]

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta")
TASKS = ("feature-extraction", "sequence-classification", "token-classification", "question-answering")

_ARCH_SUFFIX_TASK = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
}
# hidden_act / activation values → how the FFN activation is written
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_FLOAT32_MIN = float(np.finfo(np.float32).min)  # what transformers fills masked scores with


class ExportError(ValueError):
    """A checkpoint directory that cannot be turned into an ONNX model: missing files, an
    unsupported model type or task, or weights that do not match the config."""


# ----------------------------------------------------------------------------- entry point


def from_huggingface(
    model_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    task: str | None = None,
    opset: int = 17,
) -> Path | onnx.ModelProto:
    """The ONNX model of a Hugging Face BERT-family checkpoint directory (`config.json` plus
    `model.safetensors`, or a sharded `model.safetensors.index.json`).

    `task`: one of TASKS, or None to take it from the config's `architectures` (a `*Model` or any
    other architecture gives feature-extraction). `opset`: 13 or later; from 17 LayerNorm is one
    LayerNormalization op, below it is spelled out with ReduceMean.

    With `out` None the ModelProto is returned. With `out` a path (a directory means
    `out/model.onnx`) the model is saved there and the path returned; an existing file is reused
    instead of rebuilt when it is newer than `config.json` and every weight file and was built for
    the same task and opset (delete it to force a rebuild).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir} is not a directory; give the checkpoint directory holding config.json and model.safetensors")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{model_dir} has no config.json; a Hugging Face checkpoint directory needs config.json and model.safetensors")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{config_path} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{config_path}: model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not isinstance(opset, int) or not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset must be an integer from 13 to {onnx.defs.onnx_opset_version()}, got {opset!r}")
    task = _resolve_task(config, task)
    weight_files = _weight_files(model_dir)

    if out is not None:
        out = Path(out)
        if out.is_dir():
            out = out / "model.onnx"
        if _cache_valid(out, [config_path, *weight_files], model_type, task, opset):
            return out

    tensors: dict[str, np.ndarray] = {}
    for f in weight_files:
        try:
            tensors.update(load_safetensors(f))
        except SafetensorsError as exc:
            raise ExportError(str(exc)) from None
    model = _build(config, _Weights(tensors, model_type, model_dir), task, opset)
    _set_metadata(model, {"source": str(model_dir.resolve()), "model_type": model_type, "task": task, "opset": str(opset)}, config)
    if out is None:
        return model
    _save(model, out)
    return out


# ----------------------------------------------------------------------------- files


def _resolve_task(config: dict, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise ExportError(f"task {task!r} is not supported; choose one of {', '.join(TASKS)}")
        return task
    for arch in config.get("architectures") or []:
        for suffix, t in _ARCH_SUFFIX_TASK.items():
            if arch.endswith(suffix):
                return t
    return "feature-extraction"


def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{index} is not a safetensors index (a JSON object with a weight_map): {exc}") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{index} lists shard(s) that are not there: {missing}")
        return files
    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack"))
    hint = f" (found {others}: convert them to safetensors with transformers' save_pretrained(safe_serialization=True))" if others else ""
    raise ExportError(f"{model_dir} has no model.safetensors or model.safetensors.index.json{hint}")


def _cache_valid(out: Path, sources: list[Path], model_type: str, task: str, opset: int) -> bool:
    """Whether `out` may be reused: newer than every source file, built for this model/task/opset."""
    if not out.is_file():
        return False
    mtime = out.stat().st_mtime
    if any(s.stat().st_mtime > mtime for s in sources):
        return False
    try:
        meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    except Exception:  # an unreadable file is rebuilt
        return False
    return (
        meta.get("sparseinfer.model_type") == model_type
        and meta.get("sparseinfer.task") == task
        and meta.get("sparseinfer.opset") == str(opset)
    )


def _set_metadata(model: onnx.ModelProto, fields: dict[str, str], config: dict) -> None:
    del model.metadata_props[:]
    for k, v in fields.items():
        model.metadata_props.add(key=f"sparseinfer.{k}", value=v)
    if fields["task"] in ("sequence-classification", "token-classification") and isinstance(config.get("id2label"), dict):
        model.metadata_props.add(key="id2label", value=json.dumps(config["id2label"]))


def _save(model: onnx.ModelProto, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > 1_900_000_000:  # protobuf's 2 GB limit: weights go to a side file
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data")
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------- weights


class _Weights:
    """Checkpoint tensors by name, relative to the encoder's prefix ("bert.", "roberta.",
    "distilbert." in task checkpoints; none in a saved bare model)."""

    def __init__(self, tensors: dict[str, np.ndarray], model_type: str, where: Path) -> None:
        self.tensors, self.where = tensors, where
        for prefix in (f"{model_type}.", ""):
            if f"{prefix}embeddings.word_embeddings.weight" in tensors:
                self.prefix = prefix
                break
        else:
            sample = ", ".join(sorted(tensors)[:6])
            raise ExportError(
                f"{where}: no {model_type}.embeddings.word_embeddings.weight (or embeddings.word_embeddings.weight) "
                f"among the weights; is this a {model_type} checkpoint? It holds: {sample}{', …' if len(tensors) > 6 else ''}"
            )

    def _key(self, name: str, encoder: bool) -> str | None:
        full = (self.prefix if encoder else "") + name
        candidates = [full]
        if full.endswith(".weight"):  # checkpoints converted from TF name LayerNorm parameters gamma / beta
            candidates.append(full[: -len("weight")] + "gamma")
        elif full.endswith(".bias"):
            candidates.append(full[: -len("bias")] + "beta")
        return next((c for c in candidates if c in self.tensors), None)

    def has(self, name: str, encoder: bool = True) -> bool:
        return self._key(name, encoder) is not None

    def __call__(self, name: str, encoder: bool = True) -> np.ndarray:
        key = self._key(name, encoder)
        if key is None:
            raise ExportError(f"{self.where}: the weights have no {(self.prefix if encoder else '') + name!r}")
        return np.ascontiguousarray(self.tensors[key], dtype=np.float32)


# ----------------------------------------------------------------------------- graph building


class _Builder:
    """Collects nodes and initializers; names values the way torch.onnx does (`/scope/Op_output_0`)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        # filled in place: make_graph / make_model would copy every weight twice
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def weight(self, name: str, array: np.ndarray, doc: str = "") -> str:
        name = self._unique(name)
        arr = np.asarray(array)
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")  # ONNX stores little-endian
        if doc:
            t.doc_string = doc
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (a scalar or a list), shared between uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def rename(self, old: str, new: str) -> str:
        """Give a value its final name (a graph output's), everywhere it appears."""
        self._names.add(new)
        for n in self.graph.node:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]
        return new

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        name = self._unique(f"{scope}/{op_type}")
        if isinstance(outputs, int):
            outs = [self._unique(f"{name}_output_{i}") for i in range(outputs)]
        else:
            outs = [self._unique(o) for o in outputs]
        self.graph.node.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # --- layers
    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, scope: str, wname: str, bname: str) -> str:
        """x @ wᵀ + b with a torch Linear weight w [out, in]: MatMul by the stored transpose, then Add."""
        wt = self.weight(wname, w.T, doc="transposed: [in, out]")
        y = self.op("MatMul", [x, wt], scope)
        return self.op("Add", [y, self.weight(bname, b)], scope) if b is not None else y

    def gemm(self, x: str, w: np.ndarray, b: np.ndarray, scope: str, wname: str, bname: str) -> str:
        """A Linear on a 2-D input, as torch exports it: Gemm(x, w, b, transB=1)."""
        return self.op("Gemm", [x, self.weight(wname, w), self.weight(bname, b)], scope, alpha=1.0, beta=1.0, transB=1)

    def layernorm(self, x: str, gamma: np.ndarray, beta: np.ndarray, eps: float, scope: str, gname: str, bname: str) -> str:
        g, b = self.weight(gname, gamma), self.weight(bname, beta)
        if self.opset >= 17:
            return self.op("LayerNormalization", [x, g, b], scope, axis=-1, epsilon=float(eps))
        # (x - mean) / sqrt(var + eps) * gamma + beta, as torch writes it below opset 17
        mean = self.op("ReduceMean", [x], scope, axes=[-1])
        d = self.op("Sub", [x, mean], scope)
        sq = self.op("Pow", [d, self.const(2.0)], scope)
        var = self.op("ReduceMean", [sq], scope, axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.const(eps)], scope)], scope)
        y = self.op("Div", [d, std], scope)
        return self.op("Add", [self.op("Mul", [y, g], scope), b], scope)

    def activation(self, x: str, kind: str, scope: str) -> str:
        if kind == "relu":
            return self.op("Relu", [x], scope)
        if kind == "gelu":  # x * 0.5 * (1 + erf(x / sqrt 2))
            inner = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))], scope)], scope)
        else:  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))
            cube = self.op("Mul", [self.op("Pow", [x, self.const(3.0)], scope), self.const(0.044715)], scope)
            inner = self.op(
                "Tanh", [self.op("Mul", [self.op("Add", [x, cube], scope), self.const(math.sqrt(2.0 / math.pi))], scope)], scope
            )
        one_plus = self.op("Add", [inner, self.const(1.0)], scope)
        return self.op("Mul", [self.op("Mul", [x, one_plus], scope), self.const(0.5)], scope)


def _dims(config: dict, model_type: str) -> dict:
    if model_type == "distilbert":
        d = {
            "hidden": config["dim"],
            "heads": config["n_heads"],
            "layers": config["n_layers"],
            "act": config.get("activation", "gelu"),
            "eps": 1e-12,
        }
    else:
        d = {
            "hidden": config["hidden_size"],
            "heads": config["num_attention_heads"],
            "layers": config["num_hidden_layers"],
            "act": config.get("hidden_act", "gelu"),
            "eps": config.get("layer_norm_eps", 1e-12),
        }
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ExportError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
    if d["act"] not in _ACTIVATIONS:
        raise ExportError(f"activation {d['act']!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    if d["hidden"] % d["heads"]:
        raise ExportError(f"hidden size {d['hidden']} is not a multiple of the {d['heads']} attention heads")
    return d


# per model type: the checkpoint names of one encoder layer's parameters
_LAYER_NAMES = {
    "bert": {
        "layer": "encoder.layer.{i}",
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "ffn1": "intermediate.dense",
        "ffn2": "output.dense",
        "ln2": "output.LayerNorm",
    },
    "distilbert": {
        "layer": "transformer.layer.{i}",
        "q": "attention.q_lin",
        "k": "attention.k_lin",
        "v": "attention.v_lin",
        "o": "attention.out_lin",
        "ln1": "sa_layer_norm",
        "ffn1": "ffn.lin1",
        "ffn2": "ffn.lin2",
        "ln2": "output_layer_norm",
    },
}
_LAYER_NAMES["roberta"] = _LAYER_NAMES["bert"]


def _build(config: dict, W: _Weights, task: str, opset: int) -> onnx.ModelProto:
    model_type = config["model_type"]
    dims = _dims(config, model_type)
    hidden, heads = dims["hidden"], dims["heads"]
    head_dim = hidden // heads
    b = _Builder(opset)
    p = W.prefix
    root = "/" + p.rstrip(".") if p else ""

    def wname(name: str) -> str:
        return p + name

    def io(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT64, shape)

    inputs = [io("input_ids", ["batch", "sequence"]), io("attention_mask", ["batch", "sequence"])]
    if model_type == "bert":
        inputs.append(io("token_type_ids", ["batch", "sequence"]))

    # ---- embeddings: word (+ token type) + position, then LayerNorm
    scope = f"{root}/embeddings"
    x = b.op("Gather", [b.weight(wname("embeddings.word_embeddings.weight"), W("embeddings.word_embeddings.weight")), "input_ids"], scope)
    if model_type == "bert":
        types = b.weight(wname("embeddings.token_type_embeddings.weight"), W("embeddings.token_type_embeddings.weight"))
        x = b.op("Add", [x, b.op("Gather", [types, "token_type_ids"], scope)], scope)
    elif model_type == "roberta":  # takes no token types: every token has type 0
        row = W("embeddings.token_type_embeddings.weight")[0]
        x = b.op(
            "Add", [x, b.weight(wname("embeddings.token_type_embeddings.weight") + "[0]", row, doc="row 0 of the token type table")], scope
        )
    table = b.weight(wname("embeddings.position_embeddings.weight"), W("embeddings.position_embeddings.weight"))
    if model_type == "roberta":
        # position ids count the non-padding tokens from pad + 1: cumsum(ids != pad) * (ids != pad) + pad
        pad = int(config.get("pad_token_id", 1))
        not_pad = b.op("Not", [b.op("Equal", ["input_ids", b.const(pad, np.int64)], scope)], scope)
        keep = b.op("Cast", [not_pad], scope, to=TensorProto.INT64)
        count = b.op("Mul", [b.op("CumSum", [keep, b.const(1, np.int64)], scope), keep], scope)
        pos = b.op("Gather", [table, b.op("Add", [count, b.const(pad, np.int64)], scope)], scope)
    else:  # positions 0 .. sequence-1: the first rows of the table
        seq = b.op("Gather", [b.op("Shape", ["input_ids"], scope), b.const([1], np.int64)], scope, axis=0)
        pos = b.op("Slice", [table, b.const([0], np.int64), seq, b.const([0], np.int64)], scope)
    x = b.op("Add", [x, pos], scope)
    x = b.layernorm(
        x, W("embeddings.LayerNorm.weight"), W("embeddings.LayerNorm.bias"), dims["eps"], f"{scope}/LayerNorm",
        wname("embeddings.LayerNorm.weight"), wname("embeddings.LayerNorm.bias"),
    )  # fmt: skip

    # ---- additive attention mask [batch, 1, 1, sequence]: 0 where attended, float32 min where padded
    scope = f"{root}/mask"
    m = b.op("Cast", [b.op("Unsqueeze", ["attention_mask", b.const([1, 2], np.int64)], scope)], scope, to=TensorProto.FLOAT)
    mask = b.op("Mul", [b.op("Sub", [b.const(1.0), m], scope), b.const(_FLOAT32_MIN)], scope)

    # ---- encoder layers
    names = _LAYER_NAMES[model_type]
    split_shape = b.const([0, 0, heads, head_dim], np.int64)
    merge_shape = b.const([0, 0, hidden], np.int64)
    for i in range(dims["layers"]):
        layer = names["layer"].format(i=i)
        lscope = f"{root}/" + layer.replace(".layer.", "/layer.")

        def lin(x_in: str, key: str, _layer=layer, _lscope=lscope) -> str:
            n = f"{_layer}.{names[key]}"
            return b.linear(
                x_in,
                W(f"{n}.weight"),
                W(f"{n}.bias"),
                f"{_lscope}/{names[key].replace('.', '/')}",
                wname(f"{n}.weight"),
                wname(f"{n}.bias"),
            )

        def ln(x_in: str, key: str, _layer=layer, _lscope=lscope) -> str:
            n = f"{_layer}.{names[key]}"
            return b.layernorm(
                x_in, W(f"{n}.weight"), W(f"{n}.bias"), dims["eps"], f"{_lscope}/{names[key].replace('.', '/')}",
                wname(f"{n}.weight"), wname(f"{n}.bias"),
            )  # fmt: skip

        ascope = f"{lscope}/attention"
        q = b.op("Transpose", [b.op("Reshape", [lin(x, "q"), split_shape], ascope)], ascope, perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [lin(x, "k"), split_shape], ascope)], ascope, perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [lin(x, "v"), split_shape], ascope)], ascope, perm=[0, 2, 1, 3])
        scores = b.op("Div", [b.op("MatMul", [q, k], ascope), b.const(math.sqrt(head_dim))], ascope)
        probs = b.op("Softmax", [b.op("Add", [scores, mask], ascope)], ascope, axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v], ascope)], ascope, perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merge_shape], ascope)
        x = ln(b.op("Add", [lin(ctx, "o"), x], lscope), "ln1")
        h = b.activation(lin(x, "ffn1"), _ACTIVATIONS[dims["act"]], f"{lscope}/act")
        x = ln(b.op("Add", [lin(h, "ffn2"), x], lscope), "ln2")

    # ---- task head
    outputs = _head(b, W, model_type, task, x, root)
    from .. import __version__  # (here: the package imports this module)

    model = b.model
    model.graph.name = f"{model_type}-{task}"
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    model.producer_name, model.producer_version = "sparseinfer.export", __version__
    return model


def _head(b: _Builder, W: _Weights, model_type: str, task: str, x: str, root: str) -> list[onnx.ValueInfoProto]:
    def out(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def need(*names: str, encoder: bool = False) -> None:
        missing = [n for n in names if not W.has(n, encoder)]
        if missing:
            raise ExportError(f"{W.where}: task {task!r} needs the head weights {missing}, which the checkpoint does not have")

    if task == "feature-extraction":
        b.rename(x, "last_hidden_state")
        return [out("last_hidden_state", ["batch", "sequence", int(W("embeddings.word_embeddings.weight").shape[1])])]

    if task == "sequence-classification":
        # the first ([CLS] / <s>) token, then the model's own head: one hidden Linear + activation, the output Linear
        hidden_layer, activation, output_layer = {
            "bert": ("pooler.dense", "Tanh", "classifier"),
            "distilbert": ("pre_classifier", "Relu", "classifier"),
            "roberta": ("classifier.dense", "Tanh", "classifier.out_proj"),
        }[model_type]
        in_encoder = model_type == "bert"  # BERT's pooler belongs to the encoder (bert.pooler.*)
        need(f"{hidden_layer}.weight", f"{hidden_layer}.bias", encoder=in_encoder)
        need(f"{output_layer}.weight", f"{output_layer}.bias")

        def gemm(x_in: str, layer: str, encoder: bool) -> str:
            full = (W.prefix if encoder else "") + layer
            scope = "/" + full.replace(".", "/")
            return b.gemm(x_in, W(f"{layer}.weight", encoder), W(f"{layer}.bias", encoder), scope, f"{full}.weight", f"{full}.bias")

        cls = b.op("Gather", [x, b.const(0, np.int64)], "/pool", axis=1)
        h = b.op(activation, [gemm(cls, hidden_layer, in_encoder)], "/" + hidden_layer.replace(".", "/"))
        logits = b.rename(gemm(h, output_layer, False), "logits")
        return [out(logits, ["batch", int(W(f"{output_layer}.weight", False).shape[0])])]

    if task == "token-classification":
        need("classifier.weight", "classifier.bias")
        w = W("classifier.weight", False)
        logits = b.linear(x, w, W("classifier.bias", False), "/classifier", "classifier.weight", "classifier.bias")
        b.rename(logits, "logits")
        return [out("logits", ["batch", "sequence", w.shape[0]])]

    # question-answering: qa_outputs gives [batch, sequence, 2] → start, end
    need("qa_outputs.weight", "qa_outputs.bias")
    w = W("qa_outputs.weight", False)
    if w.shape[0] != 2:
        raise ExportError(f"{W.where}: qa_outputs.weight has {w.shape[0]} outputs; question answering needs 2 (start, end)")
    y = b.linear(x, w, W("qa_outputs.bias", False), "/qa_outputs", "qa_outputs.weight", "qa_outputs.bias")
    start, end = b.op("Split", [y, b.const([1, 1], np.int64)], "/qa_outputs", outputs=2, axis=-1)
    b.op("Squeeze", [start, b.const([2], np.int64)], "/qa_outputs", outputs=["start_logits"])
    b.op("Squeeze", [end, b.const([2], np.int64)], "/qa_outputs", outputs=["end_logits"])
    return [out("start_logits", ["batch", "sequence"]), out("end_logits", ["batch", "sequence"])]
