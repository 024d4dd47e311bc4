"""Load a GGUF file as a Hugging Face model whose weight matrices stay in their block codes.

The ``gguf`` package's reader gives the tensor table (cached with the config); the file is
memory-mapped and each quantized tensor is repacked once into a ``QTensor`` (lossless: the codes, scales and mins of its own format), and the memory map is
dropped, so the loaded model holds about the file's bytes and no 16- or 32-bit copy of them. The
model's modules are built without weights (accelerate's ``init_empty_weights``) and get
``QLinear`` / ``QEmbedding`` for the quantized tensors and the file's float tensors (norms) for the
rest. Tensor names, llama's q/k head order and Gemma's norm offset come from transformers' own
GGUF mapping. Config and tokenizer come from the file's metadata through transformers, cached
(with a checked manifest) because reading a 262k-token vocabulary takes ~10 s; on that first read
the file's header is parsed once and shared with transformers (``_shared_reader``).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from hire.arch import apply_rope_freqs
from hire.errors import HireError
from hire.files import atomic_dir, source_key, verify_cache, write_manifest
from hire.paths import cache_dir
from hire.quant.formats import FLOAT_FORMATS, SUPPORTED
from hire.quant.tensor import ACT_BITS, FloatLinear, QEmbedding, QLinear, QTensor
from hire.system import release_freed_memory

log = logging.getLogger("hire")

META_FORMAT = 2  # 2: with the tensor table
TABLE = "tensors.json"


class UnsupportedGGUF(HireError, ValueError):
    """A GGUF tensor in a block format HiRE cannot run, or an architecture the loader does not know."""


@dataclass
class LoadReport:
    path: Path
    seconds: float
    file_bytes: int
    weight_bytes: int  # what the loaded model holds for its weights
    formats: dict[str, int]  # GGUF format -> tensors


def _open_reader(path: Path):
    """The ``gguf`` package's reader of ``path`` (it parses every metadata field: ~8 s for a 151k-token
    vocabulary), with clear errors for a corrupt file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # gguf raises assorted errors on truncated files
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err}); re-download it") from err


def _read_header(path: Path, reader=None) -> list[dict]:
    """The tensor table of ``path`` (name, format, shape, absolute offset, bytes), from ``reader`` or a
    new one."""
    reader = reader if reader is not None else _open_reader(path)
    return [{"name": t.name, "format": t.tensor_type.name, "shape": [int(s) for s in reversed(t.shape)],
             "offset": int(t.data_offset), "nbytes": int(t.n_bytes)} for t in reader.tensors]


@contextmanager
def _shared_reader(path: Path, reader) -> Iterator[None]:
    """Inside the block, transformers' GGUF loading (``load_gguf_checkpoint``, which AutoConfig and
    AutoTokenizer each call, and which imports ``gguf.GGUFReader`` when called) gets ``reader`` for
    ``path`` instead of parsing the file again: one parse instead of three on a first load (Qwen2.5
    0.5B's 151k-token vocabulary: 8 s instead of 27). Other files get a reader of their own."""
    import gguf

    real = gguf.GGUFReader
    target = path.resolve()

    def shared(file, *args, **kwargs):
        if not args and not kwargs and Path(file).resolve() == target:
            return reader
        return real(file, *args, **kwargs)

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def meta_entry(path: Path) -> Path:
    """Where the metadata of ``path`` is cached."""
    return cache_dir("gguf-meta") / source_key(path, META_FORMAT)


def _meta_dir(path: Path) -> Path:
    """Config, tokenizer and tensor table of ``path``, read from the file once and cached (reading
    the metadata of a 262k-token vocabulary takes ~10 s; the cache key has the file's size and mtime)."""
    from transformers import AutoConfig, AutoTokenizer

    entry = meta_entry(path)
    if entry.exists():
        problem = verify_cache(entry) or (None if (entry / TABLE).is_file() else "no tensor table")
        if problem is None:
            return entry
        log.warning("cache %s is unusable (%s); rebuilding it", entry, problem)
    log.warning("reading the metadata of %s (first load; cached in %s)", path.name, entry)
    reader = _open_reader(path)
    table = _read_header(path, reader)
    try:
        with _shared_reader(path, reader):
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise UnsupportedGGUF(f"transformers could not read the metadata of {path} ({type(err).__name__}: {err})") from err
    complete_file_config(config, reader, path)
    del reader  # (its memory map of the file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with atomic_dir(entry, replace=entry.exists()) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TABLE).write_text(json.dumps(table))
        write_manifest(tmp, path, META_FORMAT)
    return entry


# Architectures transformers' GGUF table leaves out, registered in it (register_gguf_architectures)
# as llama.cpp's converter writes them: Llama's keys, plus Granite's four multipliers; SmolLM3 and
# Granite convert as Llama subclasses (q/k rows permuted: Llama's processor undoes it), OLMo 2 as a
# plain text model (not permuted). SmolLM3's NoPE layers (every fourth) are transformers' default,
# as they are llama.cpp's.
GGUF_EXTRA_ARCHITECTURES = {
    "smollm3": ({}, True),
    "olmo2": ({}, False),
    "granite": ({"attention.scale": "attention_multiplier", "embedding_scale": "embedding_multiplier",
                 "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}, True),
}


def register_gguf_architectures() -> None:
    """Add ``GGUF_EXTRA_ARCHITECTURES`` to transformers' GGUF tables (idempotent): its config reader,
    its list of supported architectures and its tensor processors (both loaders read them)."""
    from transformers.integrations import ggml
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    for arch, (extra, permuted) in GGUF_EXTRA_ARCHITECTURES.items():
        if arch not in ggml.GGUF_CONFIG_MAPPING:
            ggml.GGUF_CONFIG_MAPPING[arch] = {**ggml.GGUF_CONFIG_MAPPING["llama"], **extra}
        if arch not in gguf_utils.GGUF_SUPPORTED_ARCHITECTURES:
            gguf_utils.GGUF_SUPPORTED_ARCHITECTURES.append(arch)
        if permuted:
            gguf_utils.TENSOR_PROCESSORS.setdefault(arch, gguf_utils.TENSOR_PROCESSORS["llama"])


def complete_file_config(config, reader, path) -> None:
    """What the file says that transformers' config of it leaves out (Gemma 2's soft-caps and scale;
    complete_gemma2_config), and files whose config would be silently wrong refused (refuse_sliding_olmo)."""
    complete_gemma2_config(config, reader)
    refuse_sliding_olmo(config, reader, path)


def refuse_sliding_olmo(config, reader, path) -> None:
    """llama.cpp writes OLMo 3 files as ``olmo2`` with sliding-window layers, which the OLMo 2 config
    transformers builds from them would not have (a silent wrong answer past the window): refused."""
    if config.model_type == "olmo2" and "olmo2.attention.sliding_window" in reader.fields:
        raise UnsupportedGGUF(f"{path} is an OLMo 3 file (olmo2 with sliding-window layers), which HiRE does not "
                              "load yet; an OLMo 2 file loads")


def complete_gemma2_config(config, reader) -> None:
    """What transformers' GGUF table leaves out of a Gemma 2 file's config (its defaults are the 2B's
    and 9B's): the soft-caps as the file has them (llama.cpp writes both), and the attention scale,
    1/sqrt(hidden / heads) for the 27B (46 layers) and 1/sqrt(head_dim) otherwise, as llama.cpp
    decides it."""
    if config.model_type != "gemma2":
        return
    for key, attribute in (("gemma2.attn_logit_softcapping", "attn_logit_softcapping"),
                           ("gemma2.final_logit_softcapping", "final_logit_softcapping")):
        field = reader.fields.get(key)
        if field is not None:
            setattr(config, attribute, float(field.contents()))
    config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46
                                    else config.head_dim)


def _name_map(model: nn.Module, config) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name (gguf's table for the architecture)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_name = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch_name), None)
    if arch is None:
        raise UnsupportedGGUF(f"architecture {config.model_type!r} is not one the gguf package knows")
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for hf in dict(model.named_parameters(remove_duplicate=False)):
        module, _, suffix = hf.rpartition(".")
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf
    return names


def check_gguf_header(path: Path) -> None:
    """Clear errors for a missing file or one that is not GGUF (its first four bytes)."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); re-download or reinstall it")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _row_order(processor, name: str, rows: int) -> np.ndarray | None:
    """The row permutation transformers' processor applies to tensor ``name`` (llama's q/k), found
    by processing the row numbers; None when it leaves rows in place."""
    probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    out = np.asarray(processor.process(probe.copy(), name).weights).reshape(-1)
    if np.array_equal(out, probe[:, 0]):
        return None
    if not np.array_equal(np.sort(out), probe[:, 0]):
        raise UnsupportedGGUF(f"{name}: transformers transforms this tensor's values, not only its row order; "
                              "HiRE cannot keep it quantized")
    return out.astype(np.int64)


def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.float32, act_bits: int = ACT_BITS):
    """``(model, tokenizer, report)``: ``path``'s model with its matrices in their GGUF codes.

    ``dtype``: of the float tensors (norms) and of what modules return. ``act_bits``: the one-token
    products quantize their input per 32 columns to int16 (the float32 model's greedy tokens, to
    ~1e-5) or int8 (llama.cpp's choice: a few % faster where compute-bound, ~3 % of greedy tokens differ)."""
    check_act_bits(act_bits)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    path = Path(path)
    t0 = time.perf_counter()
    check_gguf_header(path)
    register_gguf_architectures()  # for the metadata's first read and for the tensor processors
    meta = _meta_dir(path)
    config = AutoConfig.from_pretrained(meta, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(meta, local_files_only=True)
    table = json.loads((meta / TABLE).read_text())
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    arch = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = _name_map(model, config)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r")
    formats: dict[str, int] = {}
    quantized: dict[str, QTensor] = {}
    weight_bytes = 0
    raw = None
    rope_freqs = None
    for t in table:
        name, fmt = t["name"], t["format"]
        if t["offset"] + t["nbytes"] > size:
            raise ValueError(f"{path} is truncated: tensor {name} ({fmt}) ends at byte {t['offset'] + t['nbytes']}, "
                             f"the file has {size}; re-download it")
        raw = data[t["offset"] : t["offset"] + t["nbytes"]]  # a view of the map: copied or repacked below
        hf = names.get(name)
        if hf is None:
            if name == "rope_freqs.weight":  # applied below: transformers' config of the file leaves them out
                if fmt != "F32" or t["nbytes"] % 4:
                    raise UnsupportedGGUF(f"{path}: tensor {name} is {fmt}; RoPE frequency factors are F32")
                rope_freqs = np.array(raw.view(np.float32))
                continue
            raise UnsupportedGGUF(f"{path}: tensor {name} has no place in a {config.model_type} model")
        if fmt not in SUPPORTED:
            raise UnsupportedGGUF(f"{path}: tensor {name} is {fmt}; HiRE runs {', '.join(SUPPORTED)}. "
                                  "Re-quantize the model to one of them (e.g. llama.cpp's llama-quantize --allow-requantize)")
        formats[fmt] = formats.get(fmt, 0) + 1
        shape = tuple(t["shape"])
        if fmt in FLOAT_FORMATS:
            raw = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[fmt])
            if fmt == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            values = np.asarray(processor.process(raw.astype(np.float32).reshape(shape), name).weights)
            module_name, _, attr = hf.rpartition(".")
            module = model.get_submodule(module_name)
            keep = len(shape) == 2 and isinstance(module, nn.Linear)  # a 16-bit matrix stays 16-bit
            tensor = torch.from_numpy(np.ascontiguousarray(values)).to(
                {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt] if keep else dtype)
            weight_bytes += tensor.numel() * tensor.element_size()
            param = model.get_parameter(hf)
            if tuple(param.shape) != tuple(tensor.shape):
                raise UnsupportedGGUF(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                      f"{tuple(param.shape)}")
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
            if keep and tensor.dtype != dtype and attr == "weight":
                _set_module(model, module_name, FloatLinear.wrap(module))
            continue
        if len(shape) != 2:
            raise UnsupportedGGUF(f"{path}: quantized tensor {name} has {len(shape)} dimensions; HiRE runs 2-D ones")
        expect = tuple(model.get_parameter(hf).shape)
        if shape != expect:
            raise UnsupportedGGUF(f"{path}: tensor {name} has shape {shape}, the config expects {expect}")
        try:
            q = QTensor.from_blocks(fmt, raw, shape, row_order=_row_order(processor, name, shape[0]))
        except ValueError as err:
            raise UnsupportedGGUF(f"{path}: tensor {name} ({fmt}): {err}") from err
        q.act_bits = act_bits
        weight_bytes += q.nbytes
        quantized[hf] = q
    del data, raw  # drops the memory map (no other view of it is kept): only the repacked codes stay resident
    for hf, q in quantized.items():
        module_name = hf.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            scale = float(getattr(module, "embed_scale", 1.0))
            _set_module(model, module_name, QEmbedding(q, scale, dtype))
        elif isinstance(module, nn.Linear):
            bias = module.bias if module.bias is not None and module.bias.device.type != "meta" else None
            _set_module(model, module_name, QLinear(q, bias))
        else:
            raise UnsupportedGGUF(f"{path}: {hf} is a {type(module).__name__}; HiRE quantizes Linear and Embedding weights")
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.device.type == "meta":
        embed = model.get_input_embeddings()
        if not config.tie_word_embeddings:
            raise UnsupportedGGUF(f"{path} has no output.weight and the config does not tie it to the embedding")
        if isinstance(embed, QEmbedding):
            model.set_output_embeddings(QLinear(embed.q))
        else:
            head.weight = embed.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise UnsupportedGGUF(f"{path} lacks tensors the {config.model_type} model needs: {', '.join(missing[:5])}")
    if rope_freqs is not None:
        try:
            apply_rope_freqs(model, rope_freqs)
        except ValueError as err:
            raise UnsupportedGGUF(f"{path}: {err}") from err
    model.eval()
    release_freed_memory()  # the repacking's freed intermediates (measured: ~40 MB less after SmolLM2's load)
    report = LoadReport(path, time.perf_counter() - t0, path.stat().st_size, weight_bytes, formats)
    return model, tokenizer, report


def check_act_bits(act_bits: int) -> None:
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")


def set_act_bits(model: nn.Module, act_bits: int) -> None:
    """Quantize the one-token products' activations of every GGUF matrix of ``model`` to ``act_bits``
    (16: the float32 model's logits to ~1e-5; 8: llama.cpp's choice, faster where the products are
    compute-bound, at a measured cost in quality: docs/gguf.md). An engine takes the width of its
    layers' matrices when it is built: set it before making one."""
    check_act_bits(act_bits)
    for q in quantized_matrices(model).values():
        q.act_bits = act_bits


def quantized_matrices(model: nn.Module) -> dict[str, QTensor]:
    """Every QTensor of a loaded model by module name (the tied head once)."""
    seen: dict[int, str] = {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (QLinear, QEmbedding)) and id(module.q) not in seen:
            seen[id(module.q)] = name
            out[name] = module.q
    return out


__all__ = ["LoadReport", "UnsupportedGGUF", "check_act_bits", "load_quantized", "quantized_matrices", "set_act_bits"]
