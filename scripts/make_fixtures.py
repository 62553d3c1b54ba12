"""Build the small ONNX model fixtures used by the sparseinfer test suite.

This script is run by hand, rarely, and its output is committed under
``tests/fixtures/models/``.  The test suite itself never imports torch or
transformers; it only reads the files written here.

What it does
------------
1. Builds two tiny tokenizers offline with the ``tokenizers`` library, with
   vocabularies learned from ``scripts/fixture_corpus.txt``:

   * a BERT-style uncased WordPiece tokenizer (BertNormalizer with lowercasing
     and accent stripping, BertPreTokenizer, ``##`` continuation prefix,
     ``[CLS] $A [SEP]`` / ``[CLS] $A [SEP] $B:1 [SEP]:1`` templates), used by
     the bert and distilbert fixtures (its vocabulary is learned by
     ``learn_wordpiece_vocab``, because ``WordPieceTrainer`` is not
     deterministic);
   * a RoBERTa-style byte-level BPE tokenizer (``<s> </s> <pad> <unk> <mask>``,
     RobertaProcessing), used by the roberta fixtures, trained with
     ``BpeTrainer``.

   Both are wrapped in the matching ``PreTrainedTokenizerFast`` subclass and
   written with ``save_pretrained`` so ``AutoTokenizer.from_pretrained(dir)``
   loads them as fast tokenizers.

2. Builds tiny random-weight models (hidden 32, 2 layers, 4 heads,
   intermediate 64) for bert, distilbert and roberta with three heads each:
   sequence classification (negative / neutral / positive), token
   classification (O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC) and extractive
   question answering.  Encoder weights use ``initializer_range`` =
   ``INIT_RANGE`` so activations are not trivially close to identity.  The
   final projection of every task head is then rescaled on the corpus (see
   ``calibrate_head``): each output logit gets a standard deviation of
   ``HEAD_LOGIT_STD[head]`` and a zero mean, so outputs have clear winners
   (few near-ties between labels or span positions) and every label is
   actually predicted for some inputs.

3. Exports each model with the TorchScript exporter
   (``torch.onnx.export(..., dynamo=False)``) at opset 17 (``model.onnx``) and
   opset 14 (``model-opset14.onnx``) with dynamic ``batch`` / ``sequence`` axes,
   plus one ``torch.export``-based (``dynamo=True``) export of
   bert-sequence-classification at opset 18 (``model-dynamo-opset18.onnx``).
   The dynamo graph uses different patterns: constant attention scales instead
   of a Shape/Sqrt/Div chain, no Constant nodes (all constants are
   initializers), and the key transpose done as Reshape/Transpose/Reshape.
   (At opset 14 the TorchScript exporter has no ``LayerNormalization`` and
   emits ReduceMean/Sub/Pow/Sqrt/Div chains instead.)  The models are exported
   directly (not wrapped), so embedding, bias, LayerNorm and Gemm initializers
   keep the safetensors key names (MatMul weights are transposed copies with
   generated names such as ``onnx::MatMul_302``).  Per-node doc strings (stack traces) are stripped.  Each file is
   checked with ``onnx.checker.check_model`` and saved as a single
   self-contained file (no external data).

4. Writes ``tests/fixtures/models/manifest.json`` describing every ONNX file
   (path, arch, head, opset, exporter, input / output names, output shapes,
   op-type histogram).

5. Verifies every ONNX file against the torch model with onnxruntime on a
   padded random batch (batch 2, sequence 9) and fails if the maximum absolute
   difference exceeds ``PARITY_TOL``.

Attention is exported with ``attn_implementation="sdpa"`` (the transformers
default for these architectures), so the graphs contain the attention-mask
pattern produced by ``_prepare_4d_attention_mask_for_sdpa`` and the decomposed
scaled-dot-product attention.

Requirements: ``torch==2.13.0`` (CPU wheel), ``transformers<5``, ``onnx``,
``onnxruntime``, ``tokenizers``, ``safetensors``, ``onnxscript`` (for the
dynamo export).  Run from the repository root::

    python scripts/make_fixtures.py

The output is deterministic for a given set of library versions (fixed seeds,
deterministic vocabulary learning); rerunning it rewrites identical files.

Size budget: everything under ``tests/fixtures/models`` must stay below about
5 MB, which is why the vocabularies have only ``VOCAB_SIZE`` = 384 entries
(words therefore split into many sub-word pieces, which the tests want anyway).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertTokenizerFast,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "fixture_corpus.txt"
OUT = ROOT / "tests" / "fixtures" / "models"

SEED = 1234
VOCAB_SIZE = 384
MAX_LEN = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
INIT_RANGE = 0.15
BIAS_STD = 0.1
# Target standard deviation of every task-head logit over the calibration inputs.
HEAD_LOGIT_STD = {"sequence-classification": 4.0, "token-classification": 8.0, "question-answering": 8.0}
ATTN_IMPLEMENTATION = "sdpa"
OPSETS = (17, 14)
DYNAMO_OPSET = 18
PARITY_TOL = 1e-4

SEQ_LABELS = ["negative", "neutral", "positive"]
TOKEN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]

ARCHS = ("bert", "distilbert", "roberta")
HEADS_ = ("sequence-classification", "token-classification", "question-answering")

MODEL_CLASSES = {
    ("bert", "sequence-classification"): BertForSequenceClassification,
    ("bert", "token-classification"): BertForTokenClassification,
    ("bert", "question-answering"): BertForQuestionAnswering,
    ("distilbert", "sequence-classification"): DistilBertForSequenceClassification,
    ("distilbert", "token-classification"): DistilBertForTokenClassification,
    ("distilbert", "question-answering"): DistilBertForQuestionAnswering,
    ("roberta", "sequence-classification"): RobertaForSequenceClassification,
    ("roberta", "token-classification"): RobertaForTokenClassification,
    ("roberta", "question-answering"): RobertaForQuestionAnswering,
}

# Sentences used to sanity-check the tokenizers and the decisiveness of the heads.
PROBE_PAIRS = [
    (
        "Where did Professor Helene Fischer present her measurements?",
        "Professor Helene Fischer presented new measurements of glacier retreat in Zürich.",
    ),
    ("Who runs the café?", "Maria Lopez opened a small café in São Paulo; it is not naïve to expect queues."),
    (
        "What is electroencephalography?",
        "Electroencephalography measures the electrical activity of the brain through the scalp.",
    ),
]


# --------------------------------------------------------------------------- tokenizers


def corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def learn_wordpiece_vocab(words: collections.Counter, vocab_size: int, specials: list[str]) -> dict[str, int]:
    """Frequency-based WordPiece vocabulary learning with deterministic tie-breaking.

    Same algorithm as ``tokenizers.trainers.WordPieceTrainer`` (BPE merges over
    words split into a first character plus ``##``-prefixed continuation
    characters), but the Rust trainer breaks ties between equally frequent
    pairs in hash-map order, so its vocabulary changes from run to run.  Here
    ties are broken lexicographically.
    """

    def split(word: str) -> tuple[str, ...]:
        return (word[0],) + tuple("##" + ch for ch in word[1:])

    splits = {word: split(word) for word in sorted(words)}
    alphabet = sorted({symbol for symbols in splits.values() for symbol in symbols})
    vocab = list(specials) + [symbol for symbol in alphabet if symbol not in specials]
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for word, symbols in splits.items():
            for a, b in itertools.pairwise(symbols):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        (left, right), _ = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merged = left + right[2:]
        for word, symbols in splits.items():
            if len(symbols) < 2:
                continue
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = tuple(out)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return {token: i for i, token in enumerate(vocab)}


def train_wordpiece() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: collections.Counter = collections.Counter()
    for line in corpus_lines():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[word] += 1
    vocab = learn_wordpiece_vocab(words, VOCAB_SIZE, specials)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_bytelevel_bpe() -> Tokenizer:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    tok.post_processor = processors.RobertaProcessing(
        sep=("</s>", tok.token_to_id("</s>")),
        cls=("<s>", tok.token_to_id("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap_tokenizer(arch: str, tok: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    if arch == "bert":
        return BertTokenizerFast(
            tokenizer_object=tok,
            do_lower_case=True,
            strip_accents=True,
            tokenize_chinese_chars=True,
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
            model_max_length=MAX_LEN,
        )
    if arch == "distilbert":
        return DistilBertTokenizerFast(
            tokenizer_object=tok,
            do_lower_case=True,
            strip_accents=True,
            tokenize_chinese_chars=True,
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
            model_max_length=MAX_LEN,
        )
    if arch == "roberta":
        return RobertaTokenizerFast(
            tokenizer_object=tok,
            add_prefix_space=False,
            trim_offsets=True,
            bos_token="<s>",
            eos_token="</s>",
            sep_token="</s>",
            cls_token="<s>",
            unk_token="<unk>",
            pad_token="<pad>",
            mask_token="<mask>",
            model_max_length=MAX_LEN,
        )
    raise ValueError(arch)


def check_tokenizer(directory: Path, arch: str) -> None:
    """tokenizers.Tokenizer.from_file and AutoTokenizer must agree on pair encodings."""
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(directory)
    assert auto.is_fast, f"{directory}: AutoTokenizer did not load a fast tokenizer"
    assert auto.model_max_length == MAX_LEN, auto.model_max_length
    for q, c in PROBE_PAIRS:
        enc = raw.encode(q, c)
        hf = auto(q, c)
        assert enc.ids == hf["input_ids"], (arch, enc.ids, hf["input_ids"])
        assert enc.attention_mask == hf["attention_mask"]
        if "token_type_ids" in hf:
            assert enc.type_ids == hf["token_type_ids"], (arch, enc.type_ids, hf["token_type_ids"])
        single = raw.encode(c)
        assert single.ids == auto(c)["input_ids"]
    expected_inputs = {
        "bert": {"input_ids", "token_type_ids", "attention_mask"},
        "distilbert": {"input_ids", "attention_mask"},
        "roberta": {"input_ids", "attention_mask"},
    }[arch]
    assert set(auto(PROBE_PAIRS[0][0]).keys()) == expected_inputs, auto(PROBE_PAIRS[0][0]).keys()


# --------------------------------------------------------------------------- models


def make_config(arch: str, head: str, vocab_size: int, pad_id: int):
    labels = {"sequence-classification": SEQ_LABELS, "token-classification": TOKEN_LABELS}.get(head)
    extra = {}
    if labels is not None:
        extra["id2label"] = dict(enumerate(labels))
        extra["label2id"] = {label: i for i, label in enumerate(labels)}
    common = dict(attn_implementation=ATTN_IMPLEMENTATION, pad_token_id=pad_id, **extra)
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_LEN,
            type_vocab_size=2,
            initializer_range=INIT_RANGE,
            **common,
        )
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=INTERMEDIATE,
            max_position_embeddings=MAX_LEN,
            initializer_range=INIT_RANGE,
            sinusoidal_pos_embds=False,
            **common,
        )
    if arch == "roberta":
        # RoBERTa positions start at pad_token_id + 1, hence the +2.
        return RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_LEN + 2,
            type_vocab_size=1,
            initializer_range=INIT_RANGE,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    raise ValueError(arch)


def final_head_layer(model, arch: str, head: str) -> torch.nn.Linear:
    if head == "question-answering":
        return model.qa_outputs
    if arch == "roberta" and head == "sequence-classification":
        return model.classifier.out_proj
    return model.classifier


def build_model(arch: str, head: str, vocab_size: int, pad_id: int, seed: int):
    torch.manual_seed(seed)
    config = make_config(arch, head, vocab_size, pad_id)
    model = MODEL_CLASSES[(arch, head)](config)
    randomize_affine_params(model)
    model.eval()
    return model


def randomize_affine_params(model) -> None:
    """Give every bias and LayerNorm scale / shift distinct random values.

    transformers initialises biases to 0 and LayerNorm weights to 1, so all of
    them would be identical: the exporters then deduplicate them into a single
    initializer (or Identity nodes) and a runtime that mixes them up, or drops
    a bias, would still produce the right numbers.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, BIAS_STD)
            elif "layernorm" in name.lower() or "layer_norm" in name.lower():
                param.normal_(1.0, BIAS_STD)


def calibration_batch(head: str, tokenizer) -> dict[str, torch.Tensor]:
    """Corpus sentences (single sentences, or question / context pairs for QA)."""
    lines = corpus_lines()
    if head == "question-answering":
        questions = [line for line in lines if line.endswith("?")]
        contexts = [line for line in lines if not line.endswith("?")]
        pairs = [(questions[i % len(questions)], contexts[i]) for i in range(0, len(contexts), 2)]
        return tokenizer([q for q, _ in pairs], [c for _, c in pairs], return_tensors="pt", padding=True)
    return tokenizer(lines, return_tensors="pt", padding=True)


def calibrate_head(model, arch: str, head: str, tokenizer) -> None:
    """Rescale the final head projection so its outputs are decisive and varied.

    The final linear layer's rows are scaled so that each output logit has a
    standard deviation of ``HEAD_LOGIT_STD[head]`` over the (non-padding)
    calibration inputs, and its bias is set to centre each logit on zero.
    Randomly initialised heads otherwise produce either near-ties (logits
    within a fraction of a unit) or one label winning for every input.
    """
    layer = final_head_layer(model, arch, head)
    batch = calibration_batch(head, tokenizer)
    captured = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    features = captured[0]
    if features.dim() == 3:  # token level: keep the real (non-padding) positions
        features = features[batch["attention_mask"].bool()]
    with torch.no_grad():
        raw = features @ layer.weight.T
        factor = HEAD_LOGIT_STD[head] / raw.std(dim=0)
        layer.weight.mul_(factor[:, None])
        layer.bias.copy_(-raw.mean(dim=0) * factor)


@contextlib.contextmanager
def tuple_outputs(model):
    """Make the Hugging Face model return plain tuples (needed by the exporters).

    The model itself is exported (no wrapper module), so the initializers that keep
    their names use the keys of ``model.safetensors`` (e.g. ``bert.embeddings.word_embeddings.weight``).
    """
    previous = model.config.return_dict
    model.config.return_dict = False
    try:
        yield model
    finally:
        model.config.return_dict = previous


def io_names(arch: str, head: str) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    outputs = ["start_logits", "end_logits"] if head == "question-answering" else ["logits"]
    return inputs, outputs


def random_batch(arch: str, vocab_size: int, batch: int, seq: int, seed: int, pad_id: int, special_ids):
    """Random ids framed by cls/sep, with padding at the end of all but the first row."""
    g = torch.Generator().manual_seed(seed)
    low = 5  # skip the special tokens
    ids = torch.randint(low, vocab_size, (batch, seq), generator=g, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    types = torch.zeros(batch, seq, dtype=torch.int64)
    cls_id, sep_id = special_ids
    for b in range(batch):
        length = seq - 3 * b if seq - 3 * b >= 3 else seq
        ids[b, 0] = cls_id
        ids[b, length - 1] = sep_id
        mask[b, length:] = 0
        ids[b, length:] = pad_id
        if arch == "bert":
            types[b, length // 2 : length] = 1
    return ids, mask, types


def torch_outputs(model, arch: str, head: str, ids, mask, types) -> list[np.ndarray]:
    args = (ids, mask, types) if arch == "bert" else (ids, mask)
    with torch.no_grad(), tuple_outputs(model):
        out = model(*args)
    assert isinstance(out, tuple) and len(out) == len(io_names(arch, head)[1]), type(out)
    return [o.numpy() for o in out]


# --------------------------------------------------------------------------- export


def dynamic_axes_for(head: str, inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    """batch / sequence axes; sequence-classification logits are (batch, num_labels)."""
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    for name in outputs:
        axes[name] = {0: "batch"} if head == "sequence-classification" else {0: "batch", 1: "sequence"}
    return axes


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node doc strings and metadata (Python stack traces with local file paths)."""

    def visit(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.doc_string = ""
            del value.metadata_props[:]
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        del graph.metadata_props[:]

    visit(model.graph)
    for fn in model.functions:
        fn.doc_string = ""
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]
    model.doc_string = ""
    del model.metadata_props[:]


def resave_self_contained(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=True)
    strip_debug_info(model)
    for stray in path.parent.glob(path.name + "*"):
        if stray != path:
            stray.unlink()
    onnx.save(model, str(path), save_as_external_data=False)
    for stray in path.parent.glob("*.data"):
        stray.unlink()


def summarize_warnings(caught) -> list[str]:
    lines = set()
    for w in caught:
        where = Path(w.filename)
        short = "/".join(where.parts[-3:]) if "site-packages" in where.parts else where.name
        lines.add(f"{w.category.__name__} at {short}:{w.lineno}: {str(w.message).splitlines()[0][:110]}")
    return sorted(lines)


def export_torchscript(model, arch: str, head: str, path: Path, opset: int, example) -> list[str]:
    inputs, outputs = io_names(arch, head)
    args = tuple(example[: len(inputs)])
    with warnings.catch_warnings(record=True) as caught, tuple_outputs(model):
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes_for(head, inputs, outputs),
            do_constant_folding=True,
            export_params=True,
        )
    resave_self_contained(path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return summarize_warnings(caught)


def export_dynamo(model, arch: str, head: str, path: Path, opset: int, example) -> list[str]:
    inputs, outputs = io_names(arch, head)
    args = tuple(example[: len(inputs)])
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=2, max=MAX_LEN)
    dynamic_shapes = {name: {0: batch, 1: seq} for name in ("input_ids", "attention_mask", "token_type_ids")[: len(inputs)]}
    with warnings.catch_warnings(record=True) as caught, tuple_outputs(model):
        warnings.simplefilter("always")
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verify=False,
            report=False,
        )
    proto = program.model_proto
    # Give the symbolic dims the same names as in the TorchScript exports.
    axes = dynamic_axes_for(head, inputs, outputs)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, name in axes[value.name].items():
            assert dims[index].HasField("dim_param"), (value.name, index, dims[index])
            dims[index].dim_param = name
    onnx.save(proto, str(path), save_as_external_data=False)
    resave_self_contained(path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return summarize_warnings(caught)


def check_io_shapes(proto: onnx.ModelProto, head: str, config) -> None:
    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    for value in proto.graph.input:
        assert dims(value) == ["batch", "sequence"], (value.name, dims(value))
    expected = {
        "sequence-classification": ["batch", config.num_labels],
        "token-classification": ["batch", "sequence", config.num_labels],
        "question-answering": ["batch", "sequence"],
    }[head]
    for value in proto.graph.output:
        assert dims(value) == expected, (value.name, dims(value), expected)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[f"{fn.name}/{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def onnx_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names})


# --------------------------------------------------------------------------- decisiveness


def decisiveness(model, head: str, tokenizer) -> str:
    """Summary of the top-1 minus top-2 probability gaps and of the argmax labels on the corpus."""
    batch = calibration_batch(head, tokenizer)
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"].bool()
    if head == "question-answering":
        logit_sets = [row[m] for logits in (out.start_logits, out.end_logits) for row, m in zip(logits, mask)]
    elif head == "token-classification":
        logit_sets = list(out.logits[mask])
    else:
        logit_sets = list(out.logits)
    gaps, winners = [], collections.Counter()
    for logits in logit_sets:
        p = torch.softmax(logits, -1).sort(descending=True)
        gaps.append(float(p.values[0] - p.values[1]))
        winners[int(p.indices[0])] += 1
    gaps_np = np.array(gaps)
    text = (
        f"{len(gaps)} argmaxes, top1-top2 prob gap median {np.median(gaps_np):.3f}, "
        f"<0.05: {np.mean(gaps_np < 0.05):.1%}, <0.01: {np.mean(gaps_np < 0.01):.1%}"
    )
    if head != "question-answering":
        text += f", argmax label counts {dict(sorted(winners.items()))}"
    return text


def token_variation(model, arch: str, tokenizer) -> float:
    """Mean std over tokens of the last hidden state (per feature): checks it is not near-constant."""
    enc = tokenizer(*PROBE_PAIRS[0], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1][0]
    return float(hidden.std(dim=0).mean())


# --------------------------------------------------------------------------- main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def main() -> int:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    raw_tokenizers = {"wordpiece": train_wordpiece(), "bpe": train_bytelevel_bpe()}
    tok_for_arch = {"bert": "wordpiece", "distilbert": "wordpiece", "roberta": "bpe"}

    manifest = []
    parity_rows = []
    all_warnings: dict[str, list[str]] = {}

    for a_index, arch in enumerate(ARCHS):
        raw = raw_tokenizers[tok_for_arch[arch]]
        vocab_size = raw.get_vocab_size()
        for h_index, head in enumerate(HEADS_):
            directory = OUT / f"{arch}-{head}"
            directory.mkdir()
            hf_tok = wrap_tokenizer(arch, Tokenizer.from_str(raw.to_str()))
            hf_tok.save_pretrained(directory)
            check_tokenizer(directory, arch)

            pad_id = hf_tok.pad_token_id
            model = build_model(arch, head, vocab_size, pad_id, seed=SEED + 10 * a_index + h_index)
            calibrate_head(model, arch, head, hf_tok)
            model.save_pretrained(directory, safe_serialization=True)
            variation = token_variation(model, arch, hf_tok)
            print(
                f"{arch}-{head}: vocab {vocab_size}, per-feature std over tokens of the last hidden state "
                f"{variation:.3f}; {decisiveness(model, head, hf_tok)}"
            )

            special = (hf_tok.cls_token_id, hf_tok.sep_token_id)
            export_example = random_batch(arch, vocab_size, 2, 8, SEED + 100, pad_id, special)
            check_example = random_batch(arch, vocab_size, 2, 9, SEED + 200 + a_index, pad_id, special)
            inputs, outputs = io_names(arch, head)
            feeds = dict(zip(("input_ids", "attention_mask", "token_type_ids"), (t.numpy() for t in check_example)))
            expected = torch_outputs(model, arch, head, *check_example)

            exports = [(f"model-opset{op}.onnx" if op != 17 else "model.onnx", op, "torchscript") for op in OPSETS]
            if arch == "bert" and head == "sequence-classification":
                exports.append((f"model-dynamo-opset{DYNAMO_OPSET}.onnx", DYNAMO_OPSET, "dynamo"))

            for filename, opset, exporter in exports:
                path = directory / filename
                if exporter == "torchscript":
                    caught = export_torchscript(model, arch, head, path, opset, export_example)
                else:
                    caught = export_dynamo(model, arch, head, path, opset, export_example)
                rel = path.relative_to(OUT).as_posix()
                all_warnings[rel] = caught
                proto = onnx.load(str(path))
                assert [i.name for i in proto.graph.input] == inputs, [i.name for i in proto.graph.input]
                assert [o.name for o in proto.graph.output] == outputs, [o.name for o in proto.graph.output]
                check_io_shapes(proto, head, model.config)
                got = run_onnxruntime(path, feeds)
                diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
                parity_rows.append((rel, exporter, onnx_opset(proto), diff))
                if diff >= PARITY_TOL:
                    raise SystemExit(f"{rel}: onnxruntime vs torch max abs diff {diff:.3g} >= {PARITY_TOL}")
                manifest.append(
                    {
                        "path": rel,
                        "arch": arch,
                        "head": head,
                        "opset": onnx_opset(proto),
                        "exporter": exporter,
                        "inputs": inputs,
                        "outputs": outputs,
                        "output_shapes": {
                            o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output
                        },
                        "num_labels": None if head == "question-answering" else model.config.num_labels,
                        "op_types": op_histogram(proto),
                    }
                )

            for stray in directory.iterdir():
                if stray.suffix == ".data" or stray.name.endswith(".onnx.data"):
                    stray.unlink()

    manifest_doc = {
        "description": "Tiny random-weight BERT-family ONNX fixtures generated by scripts/make_fixtures.py",
        "generator": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "seed": SEED,
            "hidden_size": HIDDEN,
            "num_layers": LAYERS,
            "num_heads": HEADS,
            "intermediate_size": INTERMEDIATE,
            "initializer_range": INIT_RANGE,
            "bias_and_layernorm_std": BIAS_STD,
            "head_logit_std": HEAD_LOGIT_STD,
            "attn_implementation": ATTN_IMPLEMENTATION,
            "max_length": MAX_LEN,
        },
        "models": manifest,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest_doc, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"{'file':58s} {'exporter':11s} {'opset':>5s} {'max|ort-torch|':>15s}")
    for rel, exporter, opset, diff in parity_rows:
        print(f"{rel:58s} {exporter:11s} {opset:5d} {diff:15.3e}")
    print()
    by_message: dict[str, list[str]] = collections.defaultdict(list)
    for rel, caught in all_warnings.items():
        for w in caught:
            by_message[w].append(rel)
    for w, files in sorted(by_message.items()):
        print(f"warning in {len(files)}/{len(all_warnings)} exports: {w}")
    print()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total fixture size: {total / 1e6:.2f} MB")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:9d}  {sha(p)}  {p.relative_to(OUT).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
