"""Magnitude pruning of a transformer's linear weights, for experiments and teaching.

`prune` zeroes the smallest-magnitude weights (or r×c blocks of weights) of the encoder's MatMul
and Gemm layers and returns a new ONNX model; `weight_sparsity` measures what a model holds.
Magnitude pruning without fine-tuning destroys a model's accuracy: use it to make sparse models
for benchmarks, tests and notebooks. Sparse models worth serving come from training-aware pruning
(e.g. oBERT with SparseML recipes), which this engine runs as they are.

Which weights are pruned. A *linear weight* is an initializer read as input B (the weight) of a
MatMul or Gemm node: 2-D and floating-point. Each is given a role:

- ``embedding``: the initializer is also the table of a Gather (a tied word embedding);
- ``head``: the task head (BERT's pooler and classifier, DistilBERT's pre_classifier/classifier,
  ``qa_outputs``, RoBERTa's classification head). The rule is graph position: every encoder layer
  of BERT, DistilBERT and RoBERTa ends in a layer norm (LayerNormalization, or the decomposed
  ``x - ReduceMean(x)`` form of older op-sets), so an encoder linear always feeds a layer norm
  downstream; a linear whose output reaches no layer norm comes after the encoder and is a head.
  It needs no names, so it holds for TorchScript and dynamo exports alike. When a graph has no
  layer norm at all the rule cannot apply, and weight or node names containing ``pooler``,
  ``pre_classifier``, ``classifier``, ``qa_outputs``, ``lm_head`` or ``score`` mark the heads;
- ``encoder``: every other linear weight.

Gather tables (embeddings) are listed with role ``embedding`` as well. A weight used by several
nodes is one weight: it is pruned once and counted once.
"""

from __future__ import annotations

import numbers
import os
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..graph.onnx_importer import ModelLike, load_model_proto

Block = tuple[int, int]

SCOPES = ("per-layer", "global")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_HEAD_NAMES = re.compile(r"(?:^|[/._:])(?:pooler|pre_classifier|classifier|qa_outputs|lm_head|score)(?:$|[/._:])")
# A serialized protobuf must stay under 2 GiB; past this many bytes of tensors, weights go to a
# side file (the margin covers the graph itself).
_INLINE_LIMIT = 2**31 - 2**27


@dataclass(frozen=True)
class _Weight:
    name: str
    role: str  # "encoder" | "head" | "embedding"
    op: str  # the first node type reading it: MatMul, Gemm or Gather
    transposed: bool | None  # stored [N, K] (Gemm transB=1); None when its users disagree


def prune(
    model: ModelLike,
    sparsity: float = 0.9,
    block: Block | None = None,
    scope: str = "per-layer",
    out: str | os.PathLike | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    heads: bool = False,
    embeddings: bool = False,
) -> onnx.ModelProto:
    """Zero the smallest-magnitude encoder weights; for experiments and teaching, not for accuracy.

    Magnitude pruning without fine-tuning destroys accuracy; real sparse models come from
    training-aware pruning (oBERT, SparseML recipes). See the module docstring for which weights
    are selected (encoder linears by default; ``heads=True`` / ``embeddings=True`` add the task
    head and the embedding tables; use `weight_sparsity` to list names and roles).

    - ``sparsity`` in [0, 1): the fraction of elements (or blocks) to zero; 0 changes nothing.
    - ``block=None`` zeroes single elements, ranked by |w|. ``block=(r, c)`` zeroes whole r×c blocks
      of the weight as the product uses it, the [K, N] view (a Gemm with transB=1 stores [N, K]: its
      blocks are c×r in storage), ranked by the block's L2 norm. The block must tile the view.
    - ``scope="per-layer"``: every weight gets round(sparsity × its elements or blocks) zeroed;
      ``"global"``: one ranking over all selected weights, round(sparsity × their total) zeroed.
      Ties are broken by position: earlier weight (first use in the graph), then row-major index
      (of the stored tensor for elements, of the [K, N] block grid for blocks) is zeroed first.
    - ``include`` / ``exclude``: regular expressions (``re.search``) on initializer names that
      narrow the selection; a pattern that matches no weight is an error, not a silent no-op.
    - ``out``: also write the model there (weights in ``<out>.data`` beside it past 2 GB).
      The source file is never modified. Returns the pruned ModelProto (weights inline).
    """
    sparsity = _check_sparsity(sparsity)
    block = _check_block(block)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    includes, excludes = _compile(include, "include"), _compile(exclude, "exclude")

    proto, _ = load_model_proto(model)
    if isinstance(model, onnx.ModelProto):  # never modify the caller's proto
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    inits = {t.name: t for t in proto.graph.initializer}
    weights = _select(_find_weights(proto.graph, inits), includes, excludes, heads, embeddings)

    arrays = {w.name: numpy_helper.to_array(inits[w.name]) for w in weights}
    scores = [_scores(w, arrays[w.name], block) for w in weights]
    if scope == "per-layer":
        masks = [_smallest(s, round(sparsity * s.size)) for s in scores]
    else:
        flat = np.concatenate(scores)
        masks = np.split(_smallest(flat, round(sparsity * flat.size)), np.cumsum([s.size for s in scores])[:-1])
    for w, mask in zip(weights, masks):
        if not mask.any():
            continue  # leave the initializer's bytes alone
        arr = arrays[w.name].copy()
        pruned = _expand(w, mask, arr.shape, block)
        if np.any(arr[pruned] != 0):
            arr[pruned] = 0
            inits[w.name].CopyFrom(numpy_helper.from_array(arr, w.name))
    if out is not None:
        _save(proto, Path(out), model)
    return proto


def weight_sparsity(model: ModelLike, block: Block | None = None) -> list[dict]:
    """One dict per linear weight and embedding table, in graph order: name, role (encoder / head /
    embedding), op, shape (as stored), size, zeros, sparsity. With ``block=(r, c)`` also blocks,
    zero_blocks and block_sparsity over the [K, N] view (None where the block does not tile it)."""
    block = _check_block(block)
    proto, _ = load_model_proto(model)
    inits = {t.name: t for t in proto.graph.initializer}
    rows = []
    for w in _find_weights(proto.graph, inits):
        arr = numpy_helper.to_array(inits[w.name])
        zeros = int(np.count_nonzero(arr == 0))
        row = {"name": w.name, "role": w.role, "op": w.op, "shape": tuple(arr.shape), "size": int(arr.size), "zeros": zeros}
        row["sparsity"] = zeros / arr.size if arr.size else 0.0
        if block is not None:
            view = _view(w, arr)
            if view is None or view.shape[0] % block[0] or view.shape[1] % block[1]:
                row.update(blocks=None, zero_blocks=None, block_sparsity=None)
            else:
                nonzero = _block_grid(view != 0, block).any(axis=(1, 3))
                row.update(blocks=int(nonzero.size), zero_blocks=int(nonzero.size - np.count_nonzero(nonzero)))
                row["block_sparsity"] = row["zero_blocks"] / row["blocks"] if row["blocks"] else 0.0
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- arguments


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r} ({type(sparsity).__name__})")
    value = float(sparsity)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}: it is the fraction of weights to zero (0.9 zeroes 90%)")
    return value


def _check_block(block) -> Block | None:
    if block is None:
        return None
    ok = isinstance(block, Sequence) and not isinstance(block, str) and len(block) == 2
    ok = ok and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in block)
    if not ok:
        raise ValueError(f"block must be None or two positive integers (rows, cols) of the [K, N] weight view, e.g. (4, 1); got {block!r}")
    return int(block[0]), int(block[1])


def _compile(patterns: Sequence[str] | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {exc}") from None
    return compiled


# ----------------------------------------------------------------------------- which weights


def _find_weights(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> list[_Weight]:
    """Linear weights and Gather tables in order of first use, with their roles."""
    heads = _head_nodes(graph)
    uses: dict[str, list[tuple[str, bool, bool]]] = {}  # name → [(op, transposed, is head)]
    for i, n in enumerate(graph.node):
        if n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        if n.op_type == "Gather":
            name, transposed = n.input[0], False
        elif n.op_type in ("MatMul", "Gemm"):
            trans_b = any(a.name == "transB" and a.i for a in n.attribute) if n.op_type == "Gemm" else False
            name, transposed = n.input[1], trans_b
        else:
            continue
        t = inits.get(name)
        if t is None or len(t.dims) != 2 or t.data_type not in _FLOAT_TYPES:
            continue
        uses.setdefault(name, []).append((n.op_type, transposed, i in heads))
    weights = []
    for name, used in uses.items():
        if any(op == "Gather" for op, _, _ in used):
            role = "embedding"
        else:
            role = "head" if all(head for _, _, head in used) else "encoder"
        orientations = {tr for op, tr, _ in used if op != "Gather"} or {False}
        weights.append(_Weight(name, role, used[0][0], orientations.pop() if len(orientations) == 1 else None))
    return weights


def _is_norm(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """LayerNormalization (any domain's fused form), or the decomposed x - ReduceMean(x)."""
    if node.op_type.endswith("LayerNormalization") or node.op_type == "RMSNormalization":
        return True
    if node.op_type == "ReduceMean" and node.input:
        x, mean = node.input[0], node.output[0]
        return any(c.op_type == "Sub" and list(c.input[:2]) == [x, mean] for c in consumers.get(mean, []))
    return False


def _head_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of MatMul/Gemm nodes that are task heads (see the module docstring for the rule)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for x in n.input:
            consumers.setdefault(x, []).append(n)
        for o in n.output:
            producer[o] = i
    linear = [i for i, n in enumerate(graph.node) if n.op_type in ("MatMul", "Gemm")]
    norms = [i for i, n in enumerate(graph.node) if _is_norm(n, consumers)]
    if not norms:  # no encoder structure to go by: fall back to names
        return {i for i in linear if _HEAD_NAMES.search(graph.node[i].name) or _HEAD_NAMES.search(graph.node[i].input[1])}
    upstream, todo = set(norms), deque(norms)  # every node some layer norm depends on
    while todo:
        for x in graph.node[todo.popleft()].input:
            p = producer.get(x)
            if p is not None and p not in upstream:
                upstream.add(p)
                todo.append(p)
    return {i for i in linear if i not in upstream}


def _select(found: list[_Weight], includes, excludes, heads: bool, embeddings: bool) -> list[_Weight]:
    if not any(w.role != "embedding" for w in found) and not (embeddings and found):
        raise ValueError(
            "the model has no prunable weights: no MatMul or Gemm node reads a 2-D floating-point initializer as its weight "
            "(weights made at run time, e.g. by Constant, Cast, Transpose or DequantizeLinear nodes, are not pruned)"
        )
    wanted = {"encoder"} | ({"head"} if heads else set()) | ({"embedding"} if embeddings else set())
    pool = [w for w in found if w.role in wanted]
    for p in includes:
        if not any(p.search(w.name) for w in pool):
            others = [w for w in found if p.search(w.name)]
            hint = (
                f" It matches {others[0].role} weight {others[0].name!r}: pass {'heads' if others[0].role == 'head' else 'embeddings'}=True."
                if others
                else f" Weight names look like {[w.name for w in pool[:3]]}; weight_sparsity(model) lists them all."
            )
            raise ValueError(f"include pattern {p.pattern!r} matches no weight selected for pruning.{hint}")
    for p in excludes:
        if not any(p.search(w.name) for w in found):
            raise ValueError(
                f"exclude pattern {p.pattern!r} matches no weight of the model; names look like {[w.name for w in found[:3]]} "
                "(weight_sparsity(model) lists them all)"
            )
    chosen = [w for w in pool if (not includes or any(p.search(w.name) for p in includes)) and not any(p.search(w.name) for p in excludes)]
    if not chosen:
        roles = sorted({w.role for w in found})
        if not pool:
            reason = f"all its linear weights are task-head weights (roles found: {roles}); pass heads=True to prune them"
        else:
            reason = "the exclude patterns remove every selected weight"
        raise ValueError(f"no weights left to prune: {reason}")
    return chosen


# ----------------------------------------------------------------------------- ranking


def _view(w: _Weight, arr: np.ndarray) -> np.ndarray | None:
    """The weight as the product uses it, [K, N] (None when its users disagree on orientation)."""
    if w.transposed is None:
        return None
    return arr.T if w.transposed else arr


def _block_grid(view: np.ndarray, block: Block) -> np.ndarray:
    (k, n), (r, c) = view.shape, block
    return view.reshape(k // r, r, n // c, c)


def _scores(w: _Weight, arr: np.ndarray, block: Block | None) -> np.ndarray:
    """A flat array of magnitudes: per element (stored order) or per block (row-major block grid)."""
    if block is None:
        scores = np.abs(arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)).reshape(-1)
    else:
        view = _view(w, arr)
        if view is None:
            raise ValueError(
                f"weight {w.name!r} is used both as [K, N] and transposed (Gemm transB=1); block pruning needs one orientation"
            )
        if view.shape[0] % block[0] or view.shape[1] % block[1]:
            shape = (
                f"[K, N] view {tuple(view.shape)} (stored transposed, {tuple(arr.shape)})" if w.transposed else f"shape {tuple(arr.shape)}"
            )
            raise ValueError(
                f"block {block} does not tile weight {w.name!r} ({w.role}) of {shape}: "
                "choose a block whose sides divide both dimensions, or exclude the weight"
            )
        grid = _block_grid(view.astype(np.float64), block)
        scores = np.sqrt(np.square(grid).sum(axis=(1, 3))).reshape(-1)  # L2 norm of each block
    scores[np.isnan(scores)] = np.inf  # never let NaN decide the ranking
    return scores


def _smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k smallest scores, ties to the lower index: the first k of a stable argsort,
    found in linear time."""
    mask = np.zeros(scores.size, dtype=bool)
    if k <= 0:
        return mask
    if k >= scores.size:
        mask[:] = True
        return mask
    kth = np.partition(scores, k - 1)[k - 1]
    mask |= scores < kth
    ties = np.flatnonzero(scores == kth)[: k - int(np.count_nonzero(mask))]
    mask[ties] = True
    return mask


def _expand(w: _Weight, mask: np.ndarray, shape: tuple[int, ...], block: Block | None) -> np.ndarray:
    """An element mask in storage layout from an element or block mask."""
    if block is None:
        return mask.reshape(shape)
    view_shape = (shape[1], shape[0]) if w.transposed else shape
    grid = mask.reshape(view_shape[0] // block[0], view_shape[1] // block[1])
    elems = np.repeat(np.repeat(grid, block[0], axis=0), block[1], axis=1)
    return elems.T if w.transposed else elems


# ----------------------------------------------------------------------------- writing


def _source_file(model: ModelLike) -> Path | None:
    if isinstance(model, onnx.ModelProto):
        return None
    path = Path(model)
    return path / "model.onnx" if path.is_dir() else path


def _save(proto: onnx.ModelProto, out: Path, model: ModelLike) -> None:
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory; pass the path of the .onnx file to write")
    source = _source_file(model)
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise ValueError(f"out={str(out)!r} is the source model; write the new model to another file (the source is never modified)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    if tensor_bytes <= _INLINE_LIMIT:
        onnx.save_model(proto, str(out))
        return
    location = out.name + ".data"
    data = out.parent / location
    if data.exists():
        if source is not None and data.resolve() in _external_files(source):
            raise ValueError(
                f"writing {str(out)!r} would overwrite {str(data)!r}, which holds the source model's weights; choose another name"
            )
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    # save_model moved the tensors' bytes out of the proto; bring them back for the caller
    onnx.external_data_helper.load_external_data_for_model(proto, str(out.parent))


def _external_files(source: Path) -> set[Path]:
    header = onnx.load(str(source), load_external_data=False)
    files = set()
    for t in header.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location:
                files.add((source.parent / location).resolve())
    return files


__all__ = ["prune", "weight_sparsity", "SCOPES"]
