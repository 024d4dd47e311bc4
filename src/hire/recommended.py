"""Recommended HiRE settings per packaged model: the ones whose figures the README reports
(`hire eval --model M` with no config uses them). Other models get ``HiReConfig()``."""

from __future__ import annotations

from hire.config import FFNConfig, HeadConfig, HiReConfig

RECOMMENDED: dict[str, HiReConfig] = {
    "smollm2-135m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=64, stage_candidates=4096),
        ffn=FFNConfig(density=0.6, proxy="int4"),
    ),
    "gemma3-270m": HiReConfig(
        head=HeadConfig(k=50, candidates=256, proxy="cascade", rank=64, stage_candidates=8192),
        ffn=FFNConfig(density=0.6, proxy="int4"),
    ),
}


def recommended_config(model_name: str) -> HiReConfig:
    return HiReConfig.from_dict(RECOMMENDED[model_name].to_dict()) if model_name in RECOMMENDED else HiReConfig()
