"""Measure each Dense weight's sparsity and block structure, and choose how to store it.

The choice is recorded on the node (`layout` = "dense" | "csr" | "bsr", `block` = (r, c) in the
weight's [K, N] orientation); the weight itself stays a dense constant in the IR, so the
reference semantics do not change and the planner packs it for the chosen kernel.

A sparse kernel only pays below a density where it beats the dense kernel; those break-even
densities were measured with `benchmarks/sparse_breakeven.py` on BERT-base shapes and are the
defaults below. Override them, force a layout, or pin single weights through
`PassContext(config={"sparsity": {...}})` (see `SparsityConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..graph import Graph
from ..graph.reference import ENGINE_DOMAIN
from .manager import PassContext, function_pass

# Highest density (fraction of non-zero elements, or of non-zero r x c blocks of the [K, N]
# weight) at which each format still beats the dense kernel. benchmarks/sparse_breakeven.py on a
# whole BERT-base layer (2 threads, M = 128) gives CSR 0.49, 4x1 0.47, 8x1 0.48 and, for blocks
# with c >= 4 columns (each activation load feeds c FMAs), 0.93-0.97. Those wide-block values do
# not carry over: at one thread (notebooks/01) and on MiniLM's 384-wide weights at 64 tokens
# (make demo) a 1x4 layout at 0.93 density ran ~10% slower than dense. Between 0.7 and 0.93 the
# possible gain is at most ~1.3x, so the wide blocks use a conservative 0.7.
MAX_DENSITY: dict[str, float] = {"csr": 0.49, "1x4": 0.7, "4x4": 0.7, "1x8": 0.7, "4x1": 0.47, "8x1": 0.48}
# Block shapes considered (those above), in the weight's [K, N] orientation.
BLOCKS: tuple[tuple[int, int], ...] = tuple(tuple(int(v) for v in k.split("x")) for k in MAX_DENSITY if k != "csr")


def _area(block: tuple[int, int] | None) -> int:
    return 1 if block is None else block[0] * block[1]


def _key(block: tuple[int, int] | None) -> str:
    return "csr" if block is None else f"{block[0]}x{block[1]}"


@dataclass
class SparsityConfig:
    """How the layout pass decides. `layout`: "auto" (measure and choose), or force "dense",
    "csr", "bsr" for every weight; `per_weight`: {weight name: layout or (layout, block)};
    `max_density`: break-even overrides per format ("csr", "1x4", …); `blocks`: block shapes
    to consider."""

    layout: str = "auto"
    per_weight: dict = field(default_factory=dict)
    max_density: dict = field(default_factory=lambda: dict(MAX_DENSITY))
    blocks: tuple = BLOCKS

    @classmethod
    def from_context(cls, ctx: PassContext) -> SparsityConfig:
        raw = ctx.config.get("sparsity", {})
        if isinstance(raw, SparsityConfig):
            return raw
        unknown = set(raw) - {"layout", "per_weight", "max_density", "blocks"}
        if unknown:
            raise ValueError(f"unknown sparsity setting(s) {sorted(unknown)}; known: layout, per_weight, max_density, blocks")
        cfg = cls(**{k: v for k, v in raw.items() if k != "max_density"})
        cfg.max_density.update(raw.get("max_density", {}))
        if cfg.layout not in ("auto", "dense", "csr", "bsr"):
            raise ValueError(f"sparsity layout must be 'auto', 'dense', 'csr' or 'bsr', got {cfg.layout!r}")
        return cfg


@dataclass(frozen=True)
class WeightStats:
    """What the pass measured about one weight."""

    shape: tuple[int, int]
    sparsity: float  # fraction of exactly-zero elements
    block_sparsity: dict  # block shape → fraction of all-zero blocks (only blocks that tile the weight)

    def density(self, layout: str, block: tuple[int, int] | None = None) -> float:
        return 1.0 - (self.block_sparsity[block] if layout == "bsr" else self.sparsity if layout == "csr" else 0.0)


def analyze_weight(w: np.ndarray, blocks=BLOCKS) -> WeightStats:
    """Sparsity of a [K, N] weight, and the fraction of all-zero blocks for each block shape."""
    zero = w == 0
    per_block = {}
    k, n = w.shape
    for r, c in blocks:
        if k % r == 0 and n % c == 0:
            per_block[(r, c)] = float(zero.reshape(k // r, r, n // c, c).all(axis=(1, 3)).mean())
    return WeightStats((k, n), float(zero.mean()), per_block)


def choose_layout(stats: WeightStats, cfg: SparsityConfig) -> tuple[str, tuple[int, int] | None]:
    """The format with the best predicted speedup over dense, break-even density / density
    (a format at its break-even density runs as fast as dense); dense if none is below it."""
    if cfg.layout != "auto":
        if cfg.layout == "bsr":
            usable = [b for b in cfg.blocks if b in stats.block_sparsity]
            if not usable:
                raise ValueError(f"no block shape in {list(cfg.blocks)} tiles a weight of shape {stats.shape}")
            return "bsr", max(usable, key=lambda b: stats.block_sparsity[b])
        return cfg.layout, None
    candidates = [(None, 1.0 - stats.sparsity)] + [(b, 1.0 - stats.block_sparsity[b]) for b in cfg.blocks if b in stats.block_sparsity]
    best, best_gain = ("dense", None), 1.0
    for block, density in candidates:
        limit = cfg.max_density.get(_key(block))
        if limit is None or density > limit:
            continue
        gain = limit / max(density, 1e-9)
        area = 1 if block is None else block[0] * block[1]
        # on a tie (both store exactly the non-zeros) the larger block: fewer index loads per value
        if gain > best_gain * (1 + 1e-9) or (gain >= best_gain * (1 - 1e-9) and best[0] != "dense" and area > _area(best[1])):
            best, best_gain = ("csr", None) if block is None else ("bsr", block), gain
    return best


@function_pass("choose_sparse_layouts", opt_level=2, requires=("fuse_dense",))
def choose_sparse_layouts(graph: Graph, ctx: PassContext) -> int:
    """Record on every Dense node the storage its weight will get (dense, CSR or BSR)."""
    cfg = SparsityConfig.from_context(ctx)
    changed = 0
    for stale in graph.nodes:
        node = graph.current(stale)
        if node.domain != ENGINE_DOMAIN or node.op != "Dense":
            continue
        w = graph.const(node.inputs[1])
        if w is None or w.ndim != 2:
            continue
        stats = analyze_weight(w, cfg.blocks)
        pinned = cfg.per_weight.get(node.inputs[1])
        if pinned is not None:
            layout, block = (pinned, None) if isinstance(pinned, str) else (pinned[0], tuple(pinned[1]))
            if layout == "bsr" and block is None:
                layout, block = choose_layout(stats, SparsityConfig(layout="bsr", blocks=cfg.blocks))
        else:
            layout, block = choose_layout(stats, cfg)
        attrs = dict(node.attrs, layout=layout, block=list(block) if block else [])
        if attrs != node.attrs:
            graph.replace_node(node, node.replace(attrs=attrs))
            changed += 1
    return changed
