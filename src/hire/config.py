"""Configuration dataclasses for HiRE, validated on construction and JSON round-trippable.

Field names are the CLI flag names (``--head-k`` sets ``HeadConfig.k``, ``--ffn-density`` sets
``FFNConfig.density``...). Checks that need the model (k above the vocabulary, a rank above the
hidden width) happen in :func:`hire.sparsify_`, which knows the shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1

HEAD_PROXIES = ("int8", "int4", "lowrank", "cascade")
FFN_PROXIES = ("int8", "int4", "exact")
AGGREGATES = ("sum", "max")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class HeadConfig:
    """HiRE on the LM head: proxy scores all vocabulary rows, exact logits for the best ``candidates``.

    The cascade (the default) scores every row with a low-rank proxy fitted to real hidden states,
    keeps ``stage_candidates`` survivors, rescoring them with an int4 copy of the head, and computes
    exact logits for the best ``candidates`` of those.
    """

    enabled: bool = True
    k: int = 50  # the top-k the sampler needs (recall@k is reported for it)
    candidates: int = 256  # k' >= k: rows computed exactly; more -> higher recall, more bytes
    proxy: str = "cascade"  # int8 | int4 | lowrank | cascade
    rank: int = 64  # low-rank proxy width (lowrank, cascade)
    rank_bits: int = 8  # storage of the low-rank factor U (8 or 16 bits)
    bits: int = 4  # the quantized proxy (int4/int8/cascade second stage)
    group_size: int = 64  # columns sharing one scale in the quantized copies
    stage_candidates: int = 2048  # cascade: survivors of the low-rank pass given to the int4 pass
    train_steps: int = 0  # low-rank proxy: Adam steps of recall training after the fit (hire calibrate); 0 = fit only
    proxy_file: str = ""  # a saved low-rank proxy (hire calibrate writes one); relative to the config file
    select_blocks: int = 0  # first pass: 0 = one exact top-k over the vocabulary; B = best 1/B of the
    #                         survivors from each of B interleaved vocabulary blocks (local top-k, faster)

    def __post_init__(self) -> None:
        _check(self.proxy in HEAD_PROXIES, f"head proxy must be one of {HEAD_PROXIES}, got {self.proxy!r}")
        _check(self.k >= 1, f"head k must be >= 1, got {self.k}")
        _check(
            self.candidates >= self.k,
            f"head candidates (k') must be >= k: got k'={self.candidates} < k={self.k}; raise --head-candidates",
        )
        _check(self.rank >= 1, f"head rank must be >= 1, got {self.rank}")
        _check(self.rank_bits in (8, 16), f"head rank_bits must be 8 or 16, got {self.rank_bits}")
        _check(self.bits in (4, 8), f"head bits must be 4 or 8, got {self.bits}")
        _check(self.group_size >= 1, f"head group_size must be >= 1, got {self.group_size}")
        _check(self.train_steps >= 0, f"head train_steps must be >= 0, got {self.train_steps}")
        _check(
            not self.proxy_file or self.proxy in ("lowrank", "cascade"),
            f"head proxy_file holds a low-rank proxy: it needs proxy 'lowrank' or 'cascade', not {self.proxy!r}",
        )
        _check(self.select_blocks >= 0, f"head select_blocks must be >= 0 (0 = exact top-k), got {self.select_blocks}")
        first = self.stage_candidates if self.proxy == "cascade" else self.candidates
        _check(
            self.select_blocks == 0 or first % self.select_blocks == 0,
            f"head select_blocks={self.select_blocks} must divide the first pass's survivors ({first})",
        )
        if self.proxy == "cascade":
            _check(
                self.stage_candidates >= self.candidates,
                f"cascade stage_candidates must be >= candidates ({self.stage_candidates} < {self.candidates})",
            )


@dataclass
class FFNConfig:
    """HiRE on the FFN: a quantized proxy predicts each neuron's activation, the best ``density``
    fraction of neurons (in groups of ``group_size`` contiguous neurons) is computed exactly."""

    enabled: bool = True
    density: float = 0.6  # fraction of FFN neurons computed per token (training-free: ~0.5-0.6)
    oversample: float = 1.0  # candidates = oversample * kept neurons (>1: exact rescoring picks the final set)
    proxy: str = "int4"  # int8 | int4 | exact (exact = the true activation, for measuring)
    bits_group_size: int = 64  # columns sharing one scale in the quantized proxy
    group_size: int = 1  # contiguous neurons selected together (1 = single neurons)
    aggregate: str = "sum"  # group score from its neurons' |activation| estimates
    layer_density: list[float] = field(default_factory=list)  # per decoder layer (hire tune); empty = density

    def __post_init__(self) -> None:
        _check(
            0.0 < self.density <= 1.0,
            f"ffn density must be in (0, 1], got {self.density}",
        )
        bad = [d for d in self.layer_density if not 0.0 < d <= 1.0]
        _check(not bad, f"ffn layer_density values must be in (0, 1], got {bad}")
        _check(self.oversample >= 1.0, f"ffn oversample must be >= 1 (k' >= k), got {self.oversample}")
        _check(self.proxy in FFN_PROXIES, f"ffn proxy must be one of {FFN_PROXIES}, got {self.proxy!r}")
        _check(self.bits_group_size >= 1, f"ffn bits_group_size must be >= 1, got {self.bits_group_size}")
        _check(self.group_size >= 1, f"ffn group_size must be >= 1, got {self.group_size}")
        _check(self.aggregate in AGGREGATES, f"ffn aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "exact": 16}[self.proxy]


@dataclass
class HiReConfig:
    """Everything :func:`hire.sparsify_` needs. ``HiReConfig()`` is the recommended setting."""

    head: HeadConfig = field(default_factory=HeadConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):
            self.head = HeadConfig(**self.head)
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        _check(
            self.version == CONFIG_VERSION,
            f"config version {self.version} is not supported (this HiRE reads version {CONFIG_VERSION})",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HiReConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        _check(not unknown, f"unknown config keys {sorted(unknown)}; expected {sorted(known)}")
        for part, klass in (("head", HeadConfig), ("ffn", FFNConfig)):
            if part in data and isinstance(data[part], dict):
                names = {f.name for f in dataclasses.fields(klass)}
                bad = set(data[part]) - names
                _check(not bad, f"unknown {part} config keys {sorted(bad)}; expected {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "HiReConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HiReConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            config = cls.from_json(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from err
        if config.head.proxy_file and not Path(config.head.proxy_file).is_absolute():
            config.head.proxy_file = str(path.parent / config.head.proxy_file)
        return config
