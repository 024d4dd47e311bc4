"""Recommended HiRE settings per packaged model: the ones whose figures the README reports
(`hire eval --model M` with no config uses them). Other models get ``HiReConfig()``."""

from __future__ import annotations

from hire.config import FFNConfig, HeadConfig, HiReConfig

# One scale per row for the cascade's int8 stage: torch's fused int8 GEMV (_weight_int8pack_mm) takes
# per-row scales, which makes rescoring the survivors a gather and one kernel call.
PER_ROW = 4096  # any group size >= the hidden width means one group per row
# The first pass keeps the best 8 of each of 512 interleaved vocabulary blocks instead of one exact
# top-4,096 (0.49 ms instead of 1.83 ms on Gemma's 262,144 rows, benchmarks/topk_selectors.py;
# held-out recall@1 0.99976 -> 0.99951).
LOCAL_BLOCKS = 512

RECOMMENDED: dict[str, HiReConfig] = {
    "smollm2-135m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=64, stage_candidates=4096, bits=8, group_size=PER_ROW,
                        select_blocks=LOCAL_BLOCKS),
        ffn=FFNConfig(density=0.6, proxy="int4"),
    ),
    "gemma3-270m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=64, stage_candidates=4096, bits=8, group_size=PER_ROW,
                        select_blocks=LOCAL_BLOCKS),
        ffn=FFNConfig(density=0.6, proxy="int4"),
    ),
}


def recommended_config(model_name: str) -> HiReConfig:
    # configs are frozen: the table's entry is handed out as it is (change it with dataclasses.replace)
    return RECOMMENDED.get(model_name, HiReConfig())
