"""Graph rewrites: the pass manager, cleanup, fusions (later: sparsity layouts, int8)."""

from .cleanup import eliminate_dead_code, eliminate_noops, fold_constants
from .fusion import (
    fuse_attention,
    fuse_attention_mask_row,
    fuse_dense,
    fuse_embedding,
    fuse_gelu,
    fuse_layernorm,
    merge_qkv,
    narrow_attention_mask,
)
from .manager import FunctionPass, IRDump, Pass, PassContext, PassError, PassInstrument, PassTimings, Sequential, function_pass
from .quant_import import fuse_quantized_epilogue, import_quantized
from .quantize import quantize_dense
from .rows import hoist_row_gather
from .sparsity import SparsityConfig, analyze_weight, choose_sparse_layouts


def default_pipeline() -> Sequential:
    """The passes an Engine runs on a graph whose input shapes are bound, in this order."""
    return Sequential(
        [
            import_quantized,  # before fold_constants, which would fold DequantizeLinear(weight) into an fp32 weight
            fold_constants,  # exporters compute reshape targets and the attention scale at run time
            eliminate_noops,
            eliminate_dead_code,
            fuse_layernorm,  # before fuse_dense: the LayerNorm pattern reads the residual Add's output by name only
            fuse_gelu,  # before fuse_dense, which absorbs a Gelu that follows its bias
            fuse_dense,
            fuse_quantized_epilogue,  # after fuse_gelu, like fuse_dense: a QDense absorbs the Gelu after its bias
            fuse_attention,  # after fuse_dense: Q, K and V are Dense outputs
            narrow_attention_mask,
            hoist_row_gather,  # before merge_qkv: the last layer's query projection then runs on the rows read
            merge_qkv,  # after fuse_attention: only projections that feed one Attention are merged
            choose_sparse_layouts,  # after merge_qkv: the merged weight is the one that gets stored
            quantize_dense,  # after choose_sparse_layouts: int8 decides the storage of a quantized weight (dense or 4x1 blocks)
            fuse_embedding,  # after fuse_layernorm: the embeddings' LayerNorm is one LayerNormalization by then
            fuse_attention_mask_row,  # after narrow_attention_mask: Attention reads the mask row it computes
            eliminate_dead_code,
        ],
        name="default",
    )


__all__ = [
    "FunctionPass", "IRDump", "Pass", "PassContext", "PassError", "PassInstrument", "PassTimings", "Sequential", "function_pass",
    "default_pipeline", "eliminate_dead_code", "eliminate_noops", "fold_constants",
    "fuse_attention", "fuse_dense", "fuse_gelu", "fuse_layernorm", "merge_qkv", "narrow_attention_mask", "choose_sparse_layouts", "quantize_dense", "SparsityConfig", "analyze_weight",
    "import_quantized", "fuse_quantized_epilogue", "fuse_embedding", "fuse_attention_mask_row", "hoist_row_gather",
]  # fmt: skip
