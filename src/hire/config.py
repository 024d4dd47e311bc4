"""Configuration dataclasses for HiRE: frozen, validated on construction, JSON round-trippable.

Field names are the CLI flag names (``--head-k`` sets ``HeadConfig.k``, ``--ffn-density`` sets
``FFNConfig.density``...). Configs are frozen: change one with ``dataclasses.replace(config, k=20)``,
which builds a new config and so validates it again. Checks that need the model (k above the
vocabulary, a rank above the hidden width, one layer density per decoder layer) happen in
:func:`hire.sparsify_`, which knows the shapes.

Every config dataclass that reads JSON (these and ``hire.train``'s ``TrainConfig`` and
``SparseFTConfig``) reads it with :func:`config_from_dict`: it checks each value against the field's
annotation and names the field (``head.k``) when the type is wrong, so a bad file is an error
message, not a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from hire.errors import ConfigError
from hire.files import atomic_write_text

CONFIG_VERSION = 1

HEAD_PROXIES = ("int8", "int4", "lowrank", "cascade")
FFN_PROXIES = ("int8", "int4", "exact")
AGGREGATES = ("sum", "max")

C = TypeVar("C")


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line reason; the CLI's flag for it shows the line as its help."""
    return field(default=default, metadata={"help": help})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --- reading and checking config dataclasses (one reader for all of them) -------------------------

_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_EXPECTED_ITEMS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each constructor field of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _scalar(kind: type, value: Any) -> tuple[bool, Any]:
    """(True, the value as a ``kind`` field holds it) when it fits, else (False, None). An integer
    is accepted for a float (and stored as one); true/false is not accepted for a number."""
    if kind is bool or kind is str:
        return isinstance(value, kind), value
    if isinstance(value, bool):
        return False, None
    if kind is int and isinstance(value, numbers.Integral):
        return True, int(value)
    if kind is float and isinstance(value, numbers.Real):
        return True, float(value)
    return False, None


def _quoted_number(kind: type, value: Any) -> str:
    """A hint for the commonest JSON slip: a number written as a string."""
    if kind in (int, float) and isinstance(value, str):
        try:
            kind(value)
        except ValueError:
            return ""
        return "; write the number without quotes"
    return ""


def _coerce(kind: Any, value: Any, path: str) -> Any:
    """``value`` as the field ``path`` of type ``kind`` holds it (an int given for a float becomes a
    float, a list for a tuple a tuple, a dict for a nested config that config); ConfigError naming
    ``path`` when its type is wrong."""
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, dict):
            return config_from_dict(kind, value, where=f"{path}.")
        keys = ", ".join(_field_types(kind))
        raise ConfigError(f"config field {path} must be an object (JSON {{...}}) with keys {keys}, got {_describe(value)}")
    if kind in _EXPECTED:
        ok, out = _scalar(kind, value)
        if not ok:
            raise ConfigError(f"config field {path} must be {_EXPECTED[kind]}, got {_describe(value)}"
                              + _quoted_number(kind, value))
        return out
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _EXPECTED:
        expected = f"config field {path} must be a list of {_EXPECTED_ITEMS[args[0]]}"
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{expected}, got {_describe(value)}")
        items = []
        for i, item in enumerate(value):
            ok, out = _scalar(args[0], item)
            if not ok:
                raise ConfigError(f"{expected}; item {i} is {_describe(item)}" + _quoted_number(args[0], item))
            items.append(out)
        return tuple(items)
    raise TypeError(f"config field {path}: fields of type {kind} are not supported by config_from_dict")


def check_field_types(config: Any, where: str = "") -> None:
    """Check the type of every field of a (frozen) config dataclass and normalise it in place (int ->
    float, list -> tuple, dict -> nested config). Each config calls it first in ``__post_init__``, so
    code, ``dataclasses.replace`` and JSON are held to the same types. ``where``: the field names'
    prefix in messages (``"head."``)."""
    for name, kind in _field_types(type(config)).items():
        object.__setattr__(config, name, _coerce(kind, getattr(config, name), where + name))


def config_from_dict(cls: type[C], data: Any, where: str = "", *, what: str = "a config") -> C:
    """A ``cls`` config dataclass from JSON-shaped ``data``, recursing into nested configs.

    Every key must be a field of ``cls`` (missing ones take their defaults) and every value of its
    field's type; otherwise ConfigError naming the field (``where`` + name, e.g. ``head.k``).
    ``what`` names the whole config when ``data`` is not a JSON object at all."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__}")
    types = _field_types(cls)
    unknown = [key for key in data if key not in types]
    if unknown:
        names = ", ".join(f"{where}{key}" for key in unknown)
        holder = f"the {where[:-1]} section" if where else what
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {names}: {holder} takes "
                          f"{', '.join(types)}; remove or rename {'them' if len(unknown) > 1 else 'it'}")
    return cls(**{key: _coerce(types[key], value, where + key) for key, value in data.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-shaped data: nested configs as dicts, tuples as lists (a fresh
    dict: changing it does not change the config)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# --- the HiRE configs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadConfig:
    """HiRE on the LM head: proxy scores all vocabulary rows, exact logits for the best ``candidates``.

    The cascade (the default) scores every row with a low-rank proxy fitted to real hidden states,
    keeps ``stage_candidates`` survivors, rescoring them with an int4 copy of the head, and computes
    exact logits for the best ``candidates`` of those.
    """

    enabled: bool = True
    k: int = setting(50, "the top-k the sampler needs (recall@k is reported for it)")
    candidates: int = setting(256, "k' >= k: rows whose logits are computed exactly; more -> higher recall, "
                                   "more bytes")
    proxy: str = setting("cascade", "the estimator that scores every vocabulary row")
    rank: int = setting(64, "low-rank proxy width (lowrank, cascade)")
    rank_bits: int = setting(8, "storage of the low-rank factor U: 4, 8 or 16 bits (4: twice the rank for "
                                "the bytes of 8)")
    bits: int = setting(4, "the quantized proxy's bits: 4 or 8 (int4/int8 and the cascade's second stage)")
    group_size: int = setting(64, "columns sharing one scale in the quantized copies")
    stage_candidates: int = setting(2048, "cascade: survivors of the low-rank pass given to the quantized pass")
    train_steps: int = setting(0, "low-rank proxy: Adam steps of recall training after the fit (0 = fit only)")
    proxy_file: str = setting("", "a saved low-rank proxy (hire calibrate writes one); relative to the config file")
    select_blocks: int = setting(0, "first pass: 0 = one exact top-k over the vocabulary; B = the best 1/B from "
                                    "each of B interleaved vocabulary blocks (local top-k, faster)")
    optimism: float = setting(0.0, "low-rank proxy: add this many times each row's error spread over the calibration "
                                   "states to its score, so the rows the proxy knows least get the benefit of the "
                                   "doubt (0 = off)")
    auto: bool = setting(False, "choose rank and k' on calibration text for the recall targets (hire.calibrate.auto: "
                                "recall@1 >= 0.995, recall@k >= 0.99), else turn the head off; models without "
                                "recommended settings get this")

    def __post_init__(self) -> None:
        check_field_types(self, "head.")
        _check(self.proxy in HEAD_PROXIES, f"head proxy must be one of {HEAD_PROXIES}, got {self.proxy!r}")
        _check(self.k >= 1, f"head k must be >= 1, got {self.k}")
        _check(
            self.candidates >= self.k,
            f"head candidates (k') must be >= k: got k'={self.candidates} < k={self.k}; raise --head-candidates",
        )
        _check(self.rank >= 1, f"head rank must be >= 1, got {self.rank}")
        _check(self.rank_bits in (4, 8, 16), f"head rank_bits must be 4, 8 or 16, got {self.rank_bits}")
        # the row spread behind the optimism then counts U's 4-bit rounding: on Gemma-3, rank 128, k' 8,192,
        # worst-domain recall@50 0.9908 without optimism, 0.9885 at 2, 0.69 at the recommended 8
        _check(self.rank_bits != 4 or self.optimism == 0,
               f"head optimism {self.optimism} with a 4-bit U (rank_bits 4) lowers recall (the spread counts the "
               "4-bit rounding): pass --head-optimism 0, or keep rank_bits 8")
        _check(self.bits in (4, 8), f"head bits must be 4 or 8, got {self.bits}")
        _check(self.group_size >= 1, f"head group_size must be >= 1, got {self.group_size}")
        _check(self.train_steps >= 0, f"head train_steps must be >= 0, got {self.train_steps}")
        _check(self.optimism >= 0, f"head optimism must be >= 0, got {self.optimism}")
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


@dataclass(frozen=True)
class FFNConfig:
    """HiRE on the FFN: a quantized proxy predicts each neuron's activation, the best ``density``
    fraction of neurons (in groups of ``group_size`` contiguous neurons) is computed exactly."""

    enabled: bool = True
    density: float = setting(0.6, "fraction of FFN neurons computed per token, in (0, 1] "
                                  "(training-free: ~0.5-0.6)")
    oversample: float = setting(1.0, "candidates = oversample x kept neurons (> 1: exact rescoring picks the "
                                     "final set)")
    proxy: str = setting("int4", "the estimator of each neuron's activation (exact = the true activation, "
                                 "for measuring)")
    bits_group_size: int = setting(64, "columns sharing one scale in the quantized proxy")
    group_size: int = setting(1, "contiguous neurons selected together (1 = single neurons)")
    aggregate: str = setting("sum", "a group's score from its neurons' |activation| estimates")
    layer_density: tuple[float, ...] = ()  # one per decoder layer (hire tune); empty = density for all
    #                                          (a list given is stored as a tuple: configs are immutable)

    def __post_init__(self) -> None:
        check_field_types(self, "ffn.")
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


@dataclass(frozen=True)
class HiReConfig:
    """Everything :func:`hire.sparsify_` needs. ``HiReConfig()`` is a generic starting point; the
    settings per model are ``hire.recommended.recommended_config`` (packaged models: measured;
    others: the head chosen on calibration text)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_field_types(self)  # also turns a dict given for head or ffn into its config
        _check(
            self.version == CONFIG_VERSION,
            f"config version {self.version} is not supported (this HiRE reads version {CONFIG_VERSION})",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (``layer_density`` as a list); ``from_dict(to_dict())`` gives an equal config."""
        return config_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "HiReConfig":
        """A config from JSON-shaped data; ConfigError naming the field for a wrong key, type or value."""
        return config_from_dict(cls, data, what="a HiRE config")

    @classmethod
    def from_json(cls, text: str) -> "HiReConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"a HiRE config must be valid JSON: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically: a crash leaves the old file or the new one, never half."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HiReConfig":
        """Read a saved config; a relative ``head.proxy_file`` is resolved against the file's folder."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
        try:
            config = cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from err
        proxy_file = config.head.proxy_file
        if proxy_file and not Path(proxy_file).is_absolute():
            config = replace(config, head=replace(config.head, proxy_file=str(path.parent / proxy_file)))
        return config
