"""What the verbs share: a parser whose errors return to ``main``, argparse types that check a
number's range while parsing, flags derived from the config dataclasses, and the model flags.

Every numeric flag is checked here, before anything loads: the message names the flag and the
allowed range (``--rounds must be an integer >= 1, got '0'``). Config fields are checked by
building the config right after parsing (``build_config``: the dataclasses validate themselves).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from typing import Any, Callable

from hire.config import AGGREGATES, FFN_PROXIES, HEAD_PROXIES, FFNConfig, HeadConfig, HiReConfig
from hire.data import CALIBRATION_WINDOWS
from hire.recommended import recommended_config
from hire.train.sparse_ft import SparseFTConfig


class UsageError(Exception):
    """A command line argparse rejected; ``main`` prints it with the verb's usage and returns 2."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser, self.message = parser, message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of exiting, so ``main`` returns the status
    (``--help`` still exits 0 after printing)."""

    def error(self, message: str) -> typing.NoReturn:
        # argparse words a rejected value "argument --rounds: must be ..."; the range checks below
        # read as one sentence, like the errors raised after parsing: "--rounds must be ..."
        ours = re.fullmatch(r"argument (-[-\w]+)(?:/-[-\w]+)*: ((?:must be|takes) .*)", message, flags=re.S)
        raise UsageError(self, f"{ours[1]} {ours[2]}" if ours else message)


# --- numbers checked while parsing ----------------------------------------------------------------
def _bounds(minimum, maximum, above, integer: bool) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if minimum is not None:
        parts.append(f">= {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    kind = "an integer" if integer else "a number"
    return f"{kind} {' and '.join(parts)}".rstrip()


def _in_range(value, minimum, maximum, above) -> bool:
    return ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
            and (above is None or value > above))


def _checked(want: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], verb: str = "must be"
             ) -> Callable[[str], Any]:
    """argparse type: ``convert(text)`` when it converts and passes ``ok``, else the error
    "<verb> <want>, got '<text>'" (argparse puts the flag in front)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{verb} {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{verb} {want}, got {text!r}")
        return value

    parse.__name__ = want  # argparse names the type in some messages
    return parse


def _split(convert: Callable[[str], Any]) -> Callable[[str], tuple]:
    return lambda text: tuple(convert(part.strip()) for part in text.split(","))


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in [minimum, maximum] (either bound optional)."""
    return _checked(_bounds(minimum, maximum, None, True), int, lambda v: _in_range(v, minimum, maximum, None))


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None
           ) -> Callable[[str], float]:
    """argparse type: a finite float >= minimum (or > above) and <= maximum."""
    return _checked(_bounds(minimum, maximum, above, False), float,
                    lambda v: math.isfinite(v) and _in_range(v, minimum, maximum, above))


def integers(minimum: int = 1) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated integers, each >= minimum (e.g. ``1,2,4``)."""
    return _checked(f"comma-separated integers >= {minimum}", _split(int), lambda vs: all(v >= minimum for v in vs))


def fractions() -> Callable[[str], tuple[float, ...]]:
    """argparse type: comma-separated numbers in (0, 1] (densities, e.g. ``0.2,0.5,1``)."""
    return _checked("comma-separated numbers in (0, 1]", _split(float), lambda vs: all(0 < v <= 1 for v in vs))


def names(choices) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated subset of ``choices`` (e.g. ``dense,da``)."""
    return _checked(f"a comma-separated subset of {','.join(choices)}", _split(str),
                    lambda vs: all(v in choices for v in vs), verb="takes")


# --- flags from the config dataclasses ------------------------------------------------------------
FIELD_CHOICES = {(HeadConfig, "proxy"): HEAD_PROXIES, (FFNConfig, "proxy"): FFN_PROXIES,
                 (FFNConfig, "aggregate"): AGGREGATES}
# fields set another way, not by a flag of their own
NOT_FLAGS = {(HeadConfig, "enabled"): "--no-head", (HeadConfig, "auto"): "--head-auto", (FFNConfig, "enabled"): "--no-ffn",
             (FFNConfig, "layer_density"): "hire tune writes it", (SparseFTConfig, "layer_density"): "--allocate"}


def field_help(cls: type, f: dataclasses.Field) -> str:
    """The flag's help: the field's one-line reason (``hire.config.setting``), % escaped for argparse."""
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"{cls.__name__}.{f.name} has no help line: declare it with hire.config.setting(default, help)")
    return text.replace("%", "%%")


def config_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The fields of ``cls`` that are flags, with their types (int, float or str)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if (cls, f.name) in NOT_FLAGS:
            continue
        kind = hints[f.name]
        if kind not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name} ({kind}) has no flag type: add it to NOT_FLAGS or teach "
                            "add_config_flags its type")
        out.append((f, kind))
    return out


def add_config_flags(group, cls: type, *, prefix: str = "", dest_prefix: str = "", show_default: bool = True) -> None:
    """A ``--PREFIXFIELD`` flag for each field of the dataclass ``cls`` (dest ``DEST_PREFIXFIELD``,
    default None = not given), typed from the field's type, with the field's help line."""
    for f, kind in config_fields(cls):
        text = field_help(cls, f)
        if show_default:
            text += f" (default {f.default})"
        parse = {int: integer(), float: number(), str: str}[kind]
        group.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=dest_prefix + f.name, type=parse,
                           default=None, choices=FIELD_CHOICES.get((cls, f.name)), metavar=f.name.upper()
                           if (cls, f.name) not in FIELD_CHOICES else None, help=text)


def given(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given: {field: value}."""
    values = {f.name: getattr(args, dest_prefix + f.name) for f, _ in config_fields(cls)}
    return {k: v for k, v in values.items() if v is not None}


# --- the model and its HiRE config ----------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, *, calib_default: int = CALIBRATION_WINDOWS, seq_len_default: int = 512) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), a Hugging Face model directory, or a .gguf file "
                        "(default: smollm2-135m)")
    p.add_argument("--config", help="HiRE config JSON (default: the recommended settings for the model)")
    head = p.add_argument_group("LM head", "each flag overrides that field of head in the config (--config, else "
                                           "the model's recommended settings)")
    add_config_flags(head, HeadConfig, prefix="head_", dest_prefix="head_", show_default=False)
    head.add_argument("--no-head", action="store_true", help="leave the LM head dense")
    head.add_argument("--head-auto", action="store_true",
                      help="choose the head's rank and k' on calibration text for recall@1 >= 0.995 and recall@k >= "
                           "0.99 (what models without recommended settings get)")
    ffn = p.add_argument_group("FFN", "each flag overrides that field of ffn in the config")
    add_config_flags(ffn, FFNConfig, prefix="ffn_", dest_prefix="ffn_", show_default=False)
    ffn.add_argument("--no-ffn", action="store_true", help="leave the FFNs dense")
    p.add_argument("--calib-windows", type=integer(minimum=1), default=calib_default,
                   help=f"calibration windows (of --seq-len tokens) for fitting the low-rank head proxy "
                        f"(default {calib_default})")
    p.add_argument("--seq-len", type=integer(minimum=2), default=seq_len_default,
                   help=f"tokens per window (default {seq_len_default})")


AUTO_KEEPS = {"k", "rank_bits"}  # head flags an auto head (--head-auto, models without settings) is chosen for


def build_config(args: argparse.Namespace) -> HiReConfig:
    """The HiRE config: --config (or the model's recommended one) with the flags given over it.
    Validated as it is built (a bad value raises ValueError naming the field), before anything loads."""
    base = HiReConfig.load(args.config) if args.config else recommended_config(args.model)
    head_flags = given(args, HeadConfig, "head_")
    head = dataclasses.replace(base.head, **head_flags)
    if head.auto and set(head_flags) - AUTO_KEEPS:  # the user set the head: nothing left to choose
        head = dataclasses.replace(head, auto=False)
    ffn = dataclasses.replace(base.ffn, **given(args, FFNConfig, "ffn_"))
    if args.head_auto:
        head = dataclasses.replace(head, auto=True)
    if args.no_head:
        head = dataclasses.replace(head, enabled=False)
    if args.no_ffn:
        ffn = dataclasses.replace(ffn, enabled=False)
    return dataclasses.replace(base, head=head, ffn=ffn)


def add_act_bits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-bits", type=integer(), choices=(16, 8), default=16,
                   help="a GGUF model's products in its codes quantize their activation per 32 columns to int16 "
                        "(default: the float32 model's logits to ~1e-5) or int8 (llama.cpp's choice: one VNNI "
                        "product per code byte instead of two, faster where the products are compute-bound, at a "
                        "measured cost: perplexity within ~1 %%, 2-4 %% of argmax positions differ; docs/gguf.md)")


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace outputs (--out, --plot) that exist already")


def add_json(p: argparse.ArgumentParser, what: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=what)


DTYPES = ["float16", "bfloat16", "float32"]


def fmt(value, spec: str = ".4f") -> str:
    """A number for a report, or '-' where there is none."""
    return "-" if value is None else format(value, spec)
