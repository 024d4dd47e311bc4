"""Native gather-GEMV kernels (C++, registered as ``torch.ops.hire.*``, built on first use).

Decode reads a few selected rows of large matrices. In eager torch that is an ``index_select``
copy followed by a GEMV (two passes over the rows and an allocation per layer); these kernels
read the selected rows in place with float32 accumulation. ``build.py`` compiles and loads them
(once per machine, into the HiRE cache); ``ops.py`` holds the functions and their eager meaning.
When they cannot be built, ``available()`` is False and callers keep their eager path, which
accumulates in float32 too.
"""

from hire.native.build import (
    NativeBuildTimeout,
    NativeUnavailableError,
    available,
    build_dir,
    build_variant,
    disabled,
    explicitly_disabled,
    unavailable_reason,
)
from hire.native.ops import (
    ACTIVATIONS,
    EAGER_ACTIVATIONS,
    KERNEL_DTYPES,
    activation_name,
    decode_model_class,
    ffn_decode,
    ffn_rows,
    gemv,
    int4_estimates,
    int4_ffn,
    lowrank_block_topk,
    pack_lowrank,
    qaxpy,
    qdequant,
    qgemv,
    qgemv_batch,
    quantize_activation,
    reference_ffn_rows,
    reference_int4_estimates,
    reference_lowrank_block_topk,
    reference_rows_axpy,
    reference_rows_dot,
    rows_axpy,
    rows_dot,
    simd_path,
    topk_rank_counts,
    usable,
)

__all__ = [
    "ACTIVATIONS",
    "EAGER_ACTIVATIONS",
    "KERNEL_DTYPES",
    "NativeBuildTimeout",
    "NativeUnavailableError",
    "activation_name",
    "available",
    "decode_model_class",
    "build_dir",
    "build_variant",
    "disabled",
    "explicitly_disabled",
    "ffn_decode",
    "ffn_rows",
    "gemv",
    "int4_estimates",
    "int4_ffn",
    "lowrank_block_topk",
    "pack_lowrank",
    "qaxpy",
    "qdequant",
    "qgemv",
    "qgemv_batch",
    "quantize_activation",
    "reference_ffn_rows",
    "reference_int4_estimates",
    "reference_lowrank_block_topk",
    "reference_rows_axpy",
    "reference_rows_dot",
    "rows_axpy",
    "rows_dot",
    "simd_path",
    "topk_rank_counts",
    "unavailable_reason",
    "usable",
]
