"""The intermediate representation: a Graph of Nodes that read and write named Values.

The IR is deliberately close to ONNX (ops keep their ONNX names and attributes, each node
records the op-set version whose semantics it follows) so that the NumPy reference executor
can be checked against the official ONNX node tests. Passes rewrite a Graph only through its
mutation API (`add_node`, `remove_node`, `replace_node`, `replace_uses`, `add_constant`), so
the name → value and producer/consumer bookkeeping stays in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A dimension is a known size, a symbol bound later ("batch", "sequence"), or unknown (None).
Dim = int | str | None
Shape = tuple[Dim, ...]


class GraphError(ValueError):
    """The graph is malformed: a dangling input, a value written twice, a cycle, …"""


@dataclass(frozen=True)
class TensorInfo:
    """Element type and (possibly symbolic) shape of a value. `shape=None` means unknown rank."""

    dtype: np.dtype | None
    shape: Shape | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        dt = "?" if self.dtype is None else self.dtype.name
        if self.shape is None:
            return f"{dt}[?]"
        return f"{dt}[{', '.join('?' if d is None else str(d) for d in self.shape)}]"


@dataclass
class Value:
    """A named tensor: a graph input, a node output, or a constant (`const` is set)."""

    name: str
    info: TensorInfo
    const: np.ndarray | None = None

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclass(frozen=True)
class Node:
    """One operation. `inputs` may contain "" for an omitted optional input (as in ONNX)."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""
    version: int = 1  # op-set version whose semantics this node follows

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "attrs", dict(self.attrs))

    def replace(self, **changes: Any) -> Node:
        """A copy with some fields changed (nodes are immutable)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        attrs = "".join(f" {k}={_short(v)}" for k, v in self.attrs.items())
        label = f" ({self.name})" if self.name else ""
        return f"{', '.join(self.outputs)} = {self.op}({', '.join(self.inputs)}){attrs}{label}"


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}" if v.size > 8 else repr(v.tolist())
    return repr(v)


class Graph:
    """A dataflow graph: named inputs, outputs, values and a topologically ordered node list."""

    def __init__(self, name: str = "graph", opset: int = 17) -> None:
        self.name = name
        self.opset = opset
        self.values: dict[str, Value] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self._nodes: list[Node] = []
        self._counter = 0

    # ---------------------------------------------------------------- reading
    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(tuple(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    def value(self, name: str) -> Value:
        try:
            return self.values[name]
        except KeyError:
            raise GraphError(f"no value named {name!r} in graph {self.name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self.value(name).info

    def const(self, name: str) -> np.ndarray | None:
        """The constant array behind `name`, or None if it is not a constant (or is omitted)."""
        v = self.values.get(name)
        return None if v is None else v.const

    def producer(self, name: str) -> Node | None:
        for node in self._nodes:
            if name in node.outputs:
                return node
        return None

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self._nodes if name in n.inputs]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    # --------------------------------------------------------------- building
    def fresh_name(self, base: str) -> str:
        """A value/node name not used yet in this graph."""
        while True:
            self._counter += 1
            name = f"{base}__{self._counter}"
            if name not in self.values:
                return name

    def add_input(self, name: str, info: TensorInfo) -> None:
        self._declare(Value(name, info))
        self.inputs.append(name)

    def add_output(self, name: str) -> None:
        if name not in self.values:
            raise GraphError(f"cannot mark {name!r} as an output: no such value")
        self.outputs.append(name)

    def add_constant(self, name: str, array: np.ndarray) -> str:
        """Declare a constant (an initializer); returns its name."""
        array = np.asarray(array)
        self._declare(Value(name, TensorInfo(array.dtype, array.shape), const=array))
        return name

    def add_node(self, node: Node, infos: Sequence[TensorInfo] | None = None, *, index: int | None = None) -> Node:
        """Append (or insert at `index`) a node; declares its outputs with `infos` (unknown if None)."""
        if infos is not None and len(infos) != len(node.outputs):
            raise GraphError(f"{node}: {len(node.outputs)} outputs but {len(infos)} infos")
        for i, out in enumerate(node.outputs):
            if out:
                self._declare(Value(out, infos[i] if infos else TensorInfo(None)))
        if index is None:
            self._nodes.append(node)
        else:
            self._nodes.insert(index, node)
        return node

    def set_info(self, name: str, info: TensorInfo) -> None:
        self.value(name).info = info

    def _find(self, node: Node) -> int:
        """Position of `node`, found by the values it defines (unique in a valid graph), so a node
        object taken before `replace_uses` rewired its inputs still finds its current version."""
        key = node.outputs
        for i, n in enumerate(self._nodes):
            if n.outputs == key:
                return i
        raise GraphError(f"node {node} is not in graph {self.name!r}")

    def current(self, node: Node) -> Node:
        """The graph's current version of `node` (nodes are immutable: rewiring replaces them)."""
        return self._nodes[self._find(node)]

    def remove_node(self, node: Node) -> None:
        """Remove a node and forget its outputs (they must be unused by then)."""
        del self._nodes[self._find(node)]
        for out in node.outputs:
            if out and out not in self.outputs:
                self.values.pop(out, None)

    def replace_node(self, old: Node, new: Node | Iterable[Node]) -> None:
        """Put `new` (one node or several, in order) where `old` was. Outputs of `old` that the
        new nodes also write keep their Value (and info); other new outputs are declared unknown."""
        new_nodes = [new] if isinstance(new, Node) else list(new)
        idx = self._find(old)
        kept = {o for n in new_nodes for o in n.outputs}
        for out in old.outputs:
            if out and out not in kept and out not in self.outputs:
                self.values.pop(out, None)
        self._nodes[idx : idx + 1] = new_nodes
        for n in new_nodes:
            for out in n.outputs:
                if out and out not in self.values:
                    self.values[out] = Value(out, TensorInfo(None))

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of value `old` (nodes and graph outputs) read `new` instead."""
        for i, n in enumerate(self._nodes):
            if old in n.inputs:
                self._nodes[i] = n.replace(inputs=tuple(new if x == old else x for x in n.inputs))
        self.outputs = [new if o == old else o for o in self.outputs]

    def remove_unused(self) -> int:
        """Drop nodes whose outputs nobody reads, and constants nobody reads. Returns nodes removed."""
        removed = 0
        live = set(self.outputs)
        for node in reversed(self._nodes):
            if any(o in live for o in node.outputs):
                live.update(i for i in node.inputs if i)
            else:
                self._nodes.remove(node)
                removed += 1
                for out in node.outputs:
                    self.values.pop(out, None)
        for name in [n for n, v in self.values.items() if v.is_const and n not in live]:
            del self.values[name]
        return removed

    def _declare(self, value: Value) -> None:
        if value.name in self.values:
            raise GraphError(f"value {value.name!r} is defined twice in graph {self.name!r}")
        self.values[value.name] = value

    # --------------------------------------------------------------- checking
    def validate(self) -> None:
        """Raise GraphError unless every node reads values defined before it, each value has
        exactly one definition, and every graph output exists. Cheap enough to run after each pass."""
        defined = set(self.inputs) | {n for n, v in self.values.items() if v.is_const}
        for name in self.inputs:
            if name not in self.values:
                raise GraphError(f"graph input {name!r} has no value")
        written: set[str] = set()
        for node in self._nodes:
            for i in node.inputs:
                if i and i not in defined:
                    raise GraphError(f"node {node}: input {i!r} is not defined before it")
            for o in node.outputs:
                if not o:
                    continue
                if o in defined or o in written:
                    raise GraphError(f"node {node}: output {o!r} is written more than once")
                if o not in self.values:
                    raise GraphError(f"node {node}: output {o!r} has no value")
                written.add(o)
                defined.add(o)
        for o in self.outputs:
            if o not in defined:
                raise GraphError(f"graph output {o!r} is never computed")

    def copy(self) -> Graph:
        """A copy whose structure can be edited independently (constant arrays are shared)."""
        g = Graph(self.name, self.opset)
        g.values = {k: dataclasses.replace(v) for k, v in self.values.items()}
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g._nodes = list(self._nodes)
        g._counter = self._counter
        return g

    def __str__(self) -> str:
        lines = [f"graph {self.name} (opset {self.opset})"]
        lines += [f"  input  {n}: {self.info(n)}" for n in self.inputs]
        lines += [f"  {n}" for n in self._nodes]
        lines += [f"  output {n}: {self.info(n)}" for n in self.outputs]
        return "\n".join(lines)
