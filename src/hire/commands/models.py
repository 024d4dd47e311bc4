"""`hire models`: what runs here: the packaged models, the architectures and the GGUF formats."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np

from hire.arch import ARCHITECTURES, engine_supported
from hire.commands._args import add_json
from hire.models import BUILTIN_MODELS, DEFAULT_MODEL

HELP = "the packaged models, architectures and GGUF formats HiRE runs"
DESCRIPTION = ("List the built-in model names (and whether their package is installed), the architectures a "
               "local Hugging Face directory or .gguf file may have (and which of them the decode engine runs; "
               "the others decode through transformers' generate()), and the GGUF block formats read in their "
               "codes, each with the bytes the kernels read per byte of the file.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_json(p)


def format_bytes() -> dict[str, float]:
    """Each GGUF block format: the bytes its repacked codes take per byte of the file (one row of
    256 columns, as ``hire.quant.QTensor.from_blocks`` makes it), and 1 for the float formats."""
    from hire.quant.formats import FLOAT_FORMATS, FORMATS
    from hire.quant.tensor import QTensor

    out = {}
    for name, fmt in FORMATS.items():
        data = np.zeros((1, 256 // fmt.block * fmt.nbytes), np.uint8)  # zero blocks: their bytes are what counts
        out[name] = QTensor.from_blocks(name, data, (1, 256)).nbytes / data.nbytes
    out.update({name: 1.0 for name in FLOAT_FORMATS})
    return out


def report() -> dict:
    models = []
    for name, m in BUILTIN_MODELS.items():
        # every package its install command names (Gemma's chunk packages too); find_spec reads no model
        # file (locating Gemma's would assemble it)
        packages = m.install.split("--no-deps", 1)[-1].split()
        installed = all(importlib.util.find_spec(pkg.replace("-", "_")) is not None for pkg in packages)
        models.append({"name": name, "default": name == DEFAULT_MODEL, "package": m.package, "installed": installed,
                       "install": m.install, "description": m.description})
    archs = [{"model_type": t, "engine": engine_supported(t)} for t in ARCHITECTURES]
    return {"models": models, "architectures": archs, "gguf_formats": format_bytes()}


def run(args: argparse.Namespace) -> int:
    r = report()
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print("packaged models (hire <verb> --model NAME):")
    for m in r["models"]:
        state = "installed" if m["installed"] else f"not installed: {m['install']}"
        print(f"  {m['name']}{' (default)' if m['default'] else ''}: {m['description']} [{state}]")
    engine = [a["model_type"] for a in r["architectures"] if a["engine"]]
    other = [a["model_type"] for a in r["architectures"] if not a["engine"]]
    print("architectures of a local Hugging Face directory or .gguf file (model_type):")
    print(f"  the decode engine: {', '.join(engine)}")
    print(f"  through transformers' generate(): {', '.join(other)}")
    print("GGUF formats read in their codes (bytes read per byte of the file):")
    print("  " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in r["gguf_formats"].items()))
    print("  any other format is refused with the tensor and the format named")
    return 0
