"""Recommended HiRE settings per packaged model: the ones whose figures docs/quality.md reports
(`hire eval --model M` with no config uses them). Other models get ``AUTO``: their head's rank and
k' are chosen on calibration text for the recall targets (hire.calibrate.auto)."""

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
    # a 576-wide head: the rank-64 factor is 5.9 % of the 16-bit head's bytes, so k' stays at 3,584
    # (9.9 % in all on the GGUF codes); 300 steps of recall training and optimism 4 (chosen on calibration
    # windows held back from the fit: benchmarks/head_optimism.py) carry recall to code in a language
    # calibration never saw
    "smollm2-135m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=64, stage_candidates=3584, bits=8, group_size=PER_ROW,
                        select_blocks=128, train_steps=300, optimism=4.0),
        # density 0.65, not 0.6: at 0.6 the int4-selected FFN lost 4.7 % perplexity on C source and 3.5 % on
        # Russian/Swedish dialogue (low-perplexity text, where every error shows); 0.65 keeps all within 2.4 %
        ffn=FFNConfig(density=0.65, proxy="int4"),
    ),
    # 262,144 rows: a 4-bit U at rank 128 (the bytes of an 8-bit rank 64) keeps k' = 8,192 (3.1 % of the
    # rows) and, fitted without training or optimism, reaches the recall targets on every held-out domain
    # (worst recall@1 0.9976, @50 0.9929). The former head (8-bit rank 64, optimism 8, k' 16,384: worst 0.9980 /
    # 0.9959) read 27.7 MiB a token against 22.0; on the AMD VM HiRE decoded 1.69-1.71x dense with it and
    # 1.92-1.99x with this one (docs/llama-cpp.md)
    "gemma3-270m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=128, rank_bits=4, stage_candidates=8192, bits=8,
                        group_size=PER_ROW, select_blocks=LOCAL_BLOCKS),
        ffn=FFNConfig(density=0.65, proxy="int4"),  # at 0.6: +3.1 % perplexity on C source
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


# models without a recommended entry: the head chosen on calibration text, FFNs at density 0.6 with the
# int4 proxy (training-free; +1.0 % perplexity on an unseen 1.5B Qwen2.5)
# a 4-bit U at up to twice the rank of an 8-bit one for its bytes: on a 0.5B Qwen-Coder's held-out C,
# recall@50 0.978 at 21.9 % of the head's bytes (8-bit, rank 128) -> see docs/models.md
AUTO = HiReConfig(head=HeadConfig(auto=True, rank_bits=4), ffn=FFNConfig(density=0.6, proxy="int4"))


def recommended_config(model_name: str) -> HiReConfig:
    # configs are frozen: the table's entry is handed out as it is (change it with dataclasses.replace)
    return RECOMMENDED.get(model_name, AUTO)
