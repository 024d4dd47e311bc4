"""Recommended HiRE settings per packaged model: the ones whose figures the README reports
(`hire eval --model M` with no config uses them). Other models get ``HiReConfig()``."""

from __future__ import annotations

from dataclasses import replace

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


def quantized_config(config: HiReConfig) -> HiReConfig:
    """``config`` for a model run in its GGUF codes (hire.quant): the head's exact rows are read in
    the head's own block format, so the cascade's int8 stage (a second copy of the head) is dropped
    and its candidates are scored exactly; the FFNs stay dense (a HiRE FFN over block codes is not
    built yet)."""
    head = config.head
    if head.enabled and head.proxy == "cascade":
        head = replace(head, proxy="lowrank", candidates=head.stage_candidates)
    return replace(config, head=head, ffn=replace(config.ffn, enabled=False))


def recommended_config(model_name: str) -> HiReConfig:
    # configs are frozen: the table's entry is handed out as it is (change it with dataclasses.replace)
    return RECOMMENDED.get(model_name, HiReConfig())
