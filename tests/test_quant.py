"""GGUF models in their block codes (hire.quant): the formats against the gguf package's own
dequantiser, the native quantized products against their eager meaning, the loader on a small GGUF
these tests write, and the engine running it."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from hire import native
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.quant import FORMATS, QLinear, QTensor, UnsupportedGGUF, load_quantized, reference_qaxpy, reference_qgemv
from hire.quant.formats import IQ4_KVALUES, LUT4, pack_codes, unpack_codes
from hire.files import write_manifest
from hire.quant.load import META_FORMAT, TABLE, _read_header, complete_gemma2_config, meta_entry
from tiny_models import make

BUILT = native.available()
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"native kernels: {native.unavailable_reason()}")
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "IQ4_NL": (0,), "IQ4_XS": (0,),
              "Q2_K": (80, 82)}


def random_blocks(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes in ``fmt``'s blocks, with finite float16 scale fields: (rows, bytes per row)."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    n = rows * cols // f.block
    blocks = rng.integers(0, 256, (n, f.nbytes), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        blocks[:, off : off + 2] = (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


FORMAT_NAMES = sorted(FORMATS)


@settings(max_examples=20)
@given(fmt=st.sampled_from(FORMAT_NAMES), rows=st.integers(1, 9), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_codes_scales_and_mins_reproduce_the_gguf_dequantiser_exactly(fmt, rows, blocks, seed):
    cols = blocks * FORMATS[fmt].block
    data = random_blocks(fmt, rows, cols, seed)
    want = dequantize(data, GGMLQuantizationType[fmt]).reshape(rows, cols)
    for layout in ("rows", "columns"):
        q = QTensor.from_blocks(fmt, data, (rows, cols), layout)
        assert np.array_equal(q.dequantize().numpy(), want), (fmt, layout)


@given(bits=st.sampled_from([4, 5, 6, 8, LUT4]), rows=st.integers(1, 5), chunks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_code_planes_round_trip(bits, rows, chunks, seed):
    rng = np.random.default_rng(seed)
    if bits == LUT4:  # IQ4's codes: its sixteen values + 128
        codes = (IQ4_KVALUES[rng.integers(0, 16, (rows, 64 * chunks))] + 128).astype(np.uint8)
    else:
        codes = rng.integers(0, 2**bits, (rows, 64 * chunks), dtype=np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape[1]), codes)


def test_float16_scales_where_exact_and_the_k_formats_keep_their_two_levels():
    assert QTensor.from_blocks("Q8_0", random_blocks("Q8_0", 4, 64, 0), (4, 64)).scales.dtype == torch.float16
    for fmt, most in (("Q4_K", 148 / 144), ("Q5_K", 180 / 176), ("Q6_K", 1.0)):
        data = random_blocks(fmt, 4, 512, 0)
        q = QTensor.from_blocks(fmt, data, (4, 512))
        assert q.two_level and q.scales.dtype == torch.int8 and q.supers.dtype == torch.float16
        assert q.nbytes <= most * data.nbytes  # the file's bytes (Q4_K/Q5_K: 12 bytes of 6-bit scales as 16)
        assert not q.to_layout("columns").two_level
        assert q.take_rows(torch.tensor([2, 0])).supers.shape == (2, q.supers.shape[1])


def test_the_bytes_of_q2_k_q3_k_and_the_iq4_formats():
    """Q2_K's and Q3_K's 2- and 3-bit codes are held as 4-bit ones (their two scale levels kept), IQ4_NL's
    and IQ4_XS's 4-bit indices as they are (read through a table): lossless (the dequantiser test), at
    these bytes per file byte."""
    for fmt, most in (("Q3_K", 146 / 110), ("Q2_K", 164 / 84), ("IQ4_NL", 1.0), ("IQ4_XS", 138 / 136)):
        data = random_blocks(fmt, 4, 512, 0)
        q = QTensor.from_blocks(fmt, data, (4, 512))
        assert q.two_level == (fmt != "IQ4_NL")
        assert q.nbytes <= most * data.nbytes, (fmt, q.nbytes / data.nbytes)


def test_a_wrong_block_count_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 8 blocks, got 4"):
        QTensor.from_blocks("Q8_0", random_blocks("Q8_0", 2, 64, 0), (4, 64))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        QTensor.from_blocks("Q4_K", random_blocks("Q8_0", 2, 64, 0), (2, 64))


# --- the native products ---------------------------------------------------------------------
def _check_products(fmt: str, rows: int, cols: int, seed: int, ops=None, act_bits: int = 8):
    """qgemv (all rows, some rows) and qaxpy (all columns, some) against their eager meaning, to
    float32 rounding: 1e-5 of the sum of the terms' magnitudes."""
    data = random_blocks(fmt, rows, cols, seed)
    q = QTensor.from_blocks(fmt, data, (rows, cols))
    q.act_bits = act_bits
    w = q.dequantize().abs()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cols, generator=g) * torch.rand(cols, generator=g) * 4  # uneven scales per group
    bound = 1e-5 * (w @ x.abs()).max() + 1e-12
    torch.testing.assert_close(native.qgemv(x, q, ops=ops), reference_qgemv(x, q), rtol=0, atol=bound)
    pick = torch.randperm(rows, generator=g)[: max(1, rows // 3)]
    torch.testing.assert_close(native.qgemv(x.view(1, -1), q, pick, ops=ops), native.qgemv(x, q, ops=ops)[pick])
    # a batch of activations, codes read once: up to 5, each row's products are exactly qgemv's; from 6
    # (activations in vector lanes on AVX-512) the same integer sums added in another order; 19 and 24
    # rows take two passes of 16 lanes, the second a short tail or lanes again
    # (the lanes take int16 activations whatever q.act_bits: with int8, a row of 6 or more is int16's)
    q16 = copy.copy(q)
    q16.act_bits = 16
    for n in (3, 5, 6, 19, 24):
        xs = torch.stack([x, -0.5 * x] + [torch.randn(cols, generator=g) * 3 for _ in range(n - 2)])
        for rows_ in (None, pick):
            want = torch.stack([native.qgemv(r, q, rows_, ops=ops) for r in xs])
            got = native.qgemv_batch(xs, q, rows_, ops=ops)
            if n < 6:
                assert torch.equal(got, want)
                continue
            bound = 1e-5 * (w @ xs.abs().T).max() + 1e-12
            want16 = torch.stack([native.qgemv(r, q16, rows_, ops=ops) for r in xs])
            for j in range(n):
                near = [bool(((got[j] - ref[j]).abs() <= bound).all()) for ref in (want, want16)]
                assert near[0] or (act_bits == 8 and near[1]), (n, j)
    qc = q.to_layout("columns")
    a = torch.randn(cols, generator=g)
    bound = 1e-5 * (w @ a.abs()).max() + 1e-12
    torch.testing.assert_close(native.qaxpy(qc, None, a, ops=ops), reference_qaxpy(qc, None, a), rtol=0, atol=bound)
    idx = torch.randperm(cols, generator=g)[: cols // 3]
    got = native.qaxpy(qc, idx, a[: idx.numel()], ops=ops)
    torch.testing.assert_close(got, reference_qaxpy(qc, idx, a[: idx.numel()]), rtol=0, atol=bound)
    torch.testing.assert_close(native.qdequant(q, ops=ops), q.eager_dequantize(), rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(native.qdequant(q, rows // 2, rows, ops=ops), q.eager_dequantize()[rows // 2 :],
                               rtol=1e-6, atol=1e-30)


@needs_kernels
@settings(max_examples=16)
@given(fmt=st.sampled_from(FORMAT_NAMES), rows=st.integers(1, 70), blocks=st.integers(1, 3), seed=st.integers(0, 2**16),
       act_bits=st.sampled_from([8, 16]))
def test_quantized_products_match_their_eager_meaning(fmt, rows, blocks, seed, act_bits):
    _check_products(fmt, rows, blocks * FORMATS[fmt].block, seed, act_bits=act_bits)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("act_bits", [8, 16])
def test_every_format_on_rows_that_are_not_whole_chunks(fmt, act_bits):
    cols = FORMATS[fmt].block * (3 if FORMATS[fmt].block == 32 else 1)  # 96: a padded last chunk
    _check_products(fmt, 37, cols, 1, act_bits=act_bits)


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS"])
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("supers", [1, 2, 3, 4])
def test_k_formats_by_super_blocks(fmt, act_bits, supers):
    """The K kernels take super-blocks two at a time where they can (Q4_K, Q5_K with int16 activations)
    and one at a time for the rest: every count up to 4 against the eager meaning."""
    _check_products(fmt, 21, 256 * supers, supers, act_bits=act_bits)


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS"])
@pytest.mark.parametrize("supers", [1, 3, 4])
def test_k_rows_two_at_a_time_equal_one_at_a_time(fmt, supers):
    """On AVX-512 with int16 activations the K kernels take two rows at a time (one from each half of a
    thread's range); each row's sums keep the one-row kernel's order: a row alone (the one-row kernel)
    equals its value in the whole product, bit for bit, and an odd count's last row too."""
    rows, cols = 23, 256 * supers
    q = QTensor.from_blocks(fmt, random_blocks(fmt, rows, cols, supers), (rows, cols))
    q.act_bits = 16
    x = torch.randn(cols, generator=torch.Generator().manual_seed(supers)) * 3
    whole = native.qgemv(x, q)
    alone = torch.cat([native.qgemv(x, q, torch.tensor([r])) for r in range(rows)])
    assert torch.equal(whole, alone)
    assert torch.equal(native.qgemv(x, q, torch.arange(rows).flip(0)), whole.flip(0))


@needs_kernels
def test_quantized_products_reject_bad_input():
    with pytest.raises(RuntimeError, match=r"rows \[2, 9\) outside \[0, 4\)"):
        native.qdequant(QTensor.from_blocks("Q8_0", random_blocks("Q8_0", 4, 64, 0), (4, 64)), 2, 9)
    q = QTensor.from_blocks("Q8_0", random_blocks("Q8_0", 4, 64, 0), (4, 64))
    with pytest.raises(RuntimeError, match="x has 32 values"):
        native.qgemv(torch.randn(32), q)
    with pytest.raises(RuntimeError, match=r"row ids must be in \[0, 4\)"):
        native.qgemv(torch.randn(64), q, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="4, 5, 6 or 8 bits"):
        torch.ops.hire.qgemv(torch.randn(64), q.codes, q.scales, q.mins, 3, 32, 64, torch.empty(0, dtype=torch.long), 8,
                             q.supers)
    k = QTensor.from_blocks("Q6_K", random_blocks("Q6_K", 4, 256, 0), (4, 256))
    with pytest.raises(RuntimeError, match=r"super-scales must be float16 \(4, 1\)"):
        torch.ops.hire.qgemv(torch.randn(256), k.codes, k.scales, k.mins, 6, 16, 256, torch.empty(0, dtype=torch.long),
                             8, k.supers.float())
    qc = q.to_layout("columns")
    with pytest.raises(RuntimeError, match="3 coefficients for 2 columns"):
        native.qaxpy(qc, torch.tensor([0, 1]), torch.randn(3))


# --- a small GGUF, written here ----------------------------------------------------------------
LAYER_FORMATS = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
                 "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q5_0"}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion order of q/k rows (the loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, overrides: dict | None = None, drop: tuple[str, ...] = (), extra: dict | None = None):
    """A tiny Llama as a GGUF of mixed block formats, and the float32 model of the same values
    (the dequantized codes). ``overrides``: tensor name -> format; ``drop``: tensors left out;
    ``extra``: more F32 tensors by name (the float model does not see them)."""
    model = make("llama")
    cfg = model.config
    ref = make("llama")
    writer = GGUFWriter(str(path), "llama")
    formats = {}

    def add(name: str, hf: str, fmt: str, permute_heads: int | None = None):
        fmt = (overrides or {}).get(name, fmt)
        w = model.get_parameter(hf).detach().numpy().astype(np.float32)
        if permute_heads:
            w = _permute(w, permute_heads)
        qtype = None if fmt == "F32" else GGMLQuantizationType[fmt]
        if qtype is None:
            data, back = w, w
        elif fmt in ("F16", "BF16"):
            data = quantize(w, qtype)
            back = dequantize(data, qtype).reshape(w.shape)
        elif fmt in FORMATS:
            data = quantize(w, qtype) if fmt in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") else random_blocks(fmt, *w.shape, 0)
            if fmt == "IQ4_NL":  # random indices under a scale near the matrix's
                data.reshape(-1, 18)[:, :2] = np.full(data.size // 18, np.abs(w).max() / 127, np.float16).view(np.uint8).reshape(-1, 2)
            back = dequantize(data, qtype).reshape(w.shape)
        else:  # a format HiRE does not run: zero blocks of the right size
            block, nbytes = GGML_QUANT_SIZES[qtype]
            data, back = np.zeros((w.shape[0], w.shape[1] // block * nbytes), np.uint8), np.zeros_like(w)
        if permute_heads:  # the float reference holds the rows in the model's own order
            back = _unpermute(back, permute_heads)
        with torch.no_grad():
            ref.get_parameter(hf).copy_(torch.from_numpy(np.ascontiguousarray(back)))
        if name in drop:
            return
        writer.add_tensor(name, data, raw_dtype=qtype)
        formats[name] = fmt

    add("token_embd.weight", "model.embed_tokens.weight", "Q8_0")
    add("output_norm.weight", "model.norm.weight", "F32")
    for i in range(cfg.num_hidden_layers):
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", "F32")
        add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", "F32")
        for short, fmt in LAYER_FORMATS.items():
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(short)
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{HF_NAMES[short]}.weight", fmt, heads)
    for name, values in (extra or {}).items():
        writer.add_tensor(name, np.asarray(values, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _write_meta(path, cfg)
    return ref.eval(), formats


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_meta(path, cfg):
    """The loader's metadata cache entry for ``path`` (config, a word-level tokenizer, the tensor table),
    as a first load writes it from a real file's metadata."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    entry = meta_entry(path)
    entry.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(entry)
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate("the and of to a i you my in that".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(entry)
    (entry / TABLE).write_text(json.dumps(_read_header(path)))
    write_manifest(entry, path, META_FORMAT)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    ref, formats = write_gguf(path)
    return path, ref, formats


def test_a_loaded_gguf_keeps_its_codes_and_computes_the_float32_model(small_gguf):
    path, ref, formats = small_gguf
    model, _, report = load_quantized(path)
    assert report.formats == {fmt: list(formats.values()).count(fmt) for fmt in set(formats.values())}
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)
    assert model.lm_head.q is model.model.embed_tokens.q  # tied: one copy
    assert not any(p.dim() >= 2 for p in model.parameters())  # no float copy of any matrix
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_engine_runs_the_codes_natively_like_its_eager_step(small_gguf):
    path, ref, _ = small_gguf
    model, _, _ = load_quantized(path)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=40)
    assert engine.kernel_report()["step"] == "native"
    eager = Engine(load_quantized(path)[0], None, dtype=torch.float32, max_seq_len=40, fused=False)
    prompt = torch.randint(0, ref.config.vocab_size, (6,))
    with torch.inference_mode():
        hidden = [e.forward(prompt, 0, hire=False) for e in (engine, eager)]
        for pos in range(6, 30):
            token = torch.tensor([pos % ref.config.vocab_size])
            hidden = [e.forward(token, pos, hire=False) for e in (engine, eager)]
            # int16 activations: where the fused step's vectorised silu and torch's differ in the last bit,
            # an FFN activation's int16 code can round the other way (a step of max|x| / 32512)
            torch.testing.assert_close(hidden[0], hidden[1], rtol=3e-4, atol=3e-4)
    # and the float32 model's greedy tokens (int16 activations in the one-token products)
    fp = Engine(ref, None, dtype=torch.float32, max_seq_len=40)
    tokens = torch.randint(0, ref.config.vocab_size, (24,))
    assert engine.teacher_forced(tokens, hire=False)[0] == fp.teacher_forced(tokens, hire=False)[0]
    with pytest.raises(ValueError, match="act_bits must be 8 or 16"):
        load_quantized(path, act_bits=4)


def test_the_model_s_q_k_v_read_the_engine_s_fused_codes(tmp_path):
    """One copy of the codes: the model's q, k and v become row views of the engine's fused q/k/v
    (where their formats fuse), and the model still computes the float32 model."""
    path = tmp_path / "qkv-q8.gguf"
    same = {f"blk.{i}.attn_{p}.weight": "Q8_0" for i in range(16) for p in "qkv"}
    ref, _ = write_gguf(path, overrides=same)
    model, _, _ = load_quantized(path)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=40)
    fused = 0
    for layer in engine.layers:
        attn = layer.module.self_attn
        parts = (attn.q_proj.q, attn.k_proj.q, attn.v_proj.q)
        if isinstance(layer.qkv, QTensor):
            fused += 1
            assert all(p.codes.untyped_storage().data_ptr() == layer.qkv.codes.untyped_storage().data_ptr() for p in parts)
            assert sum(p.shape[0] for p in parts) == layer.qkv.shape[0]
    assert fused > 0
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_hire_head_reads_the_candidates_rows_in_their_codes(small_gguf):
    from hire.config import HeadConfig, HiReConfig, FFNConfig

    path, ref, _ = small_gguf
    model, _, _ = load_quantized(path)
    vocab = ref.config.vocab_size
    cfg = HiReConfig(head=HeadConfig(k=8, candidates=vocab, proxy="int8", group_size=64), ffn=FFNConfig(enabled=False))
    engine = Engine(model, cfg, dtype=torch.float32, max_seq_len=40)
    dense = Engine(load_quantized(path)[0], None, dtype=torch.float32, max_seq_len=40)
    tokens = torch.randint(0, vocab, (20,))
    assert engine.teacher_forced(tokens, hire=True)[0] == dense.teacher_forced(tokens, hire=False)[0]  # k' = n: exact


def test_a_hire_ffn_over_codes_is_refused_with_the_way_out(small_gguf):
    import hire

    model, _, _ = load_quantized(small_gguf[0])
    with pytest.raises(ValueError, match="--no-ffn"):
        hire.sparsify_(model, hire.HiReConfig(head=hire.HeadConfig(enabled=False)))


def assert_decodes_like(model, ref) -> torch.Tensor:
    """``model`` (a loaded GGUF) computes ``ref``'s logits (the float32 model of the file's values), and
    the engine's native step on it teacher-forces ``ref``'s greedy tokens; returns the ids it used."""
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=40)
    assert engine.kernel_report()["step"] == "native"
    tokens = torch.randint(0, ref.config.vocab_size, (24,))
    fp = Engine(ref, None, dtype=torch.float32, max_seq_len=40)
    assert engine.teacher_forced(tokens, hire=False)[0] == fp.teacher_forced(tokens, hire=False)[0]
    return ids


@needs_kernels
def test_iq4_nl_matrices_load_and_decode_like_the_float32_model(tmp_path):
    """A file with IQ4_NL matrices (the non-linear format, read as 8-bit codes) among the others: the
    loaded model computes the float32 model of the file's values, and the native step its greedy tokens."""
    path = tmp_path / "iq4.gguf"
    ref, formats = write_gguf(path, overrides={"blk.0.ffn_up.weight": "IQ4_NL", "blk.1.attn_v.weight": "IQ4_NL",
                                               "blk.1.ffn_down.weight": "IQ4_NL"})
    model, _, report = load_quantized(path)
    assert report.formats["IQ4_NL"] == 3
    ids = assert_decodes_like(model, ref)


def write_arch_gguf(path, arch: str, formats=("Q8_0", "Q4_1", "IQ4_NL"), *, model=None, header=None,
                    permuted: bool = False):
    """A tiny ``arch`` model (tests/tiny_models, or ``model``) as a GGUF: its matrices in ``formats`` in
    turn (gguf's own quantizer, or random blocks), the rest F32, named by gguf's table for the
    architecture; returns the float32 model of the file's values. ``header(writer, config)``: the file's
    metadata (then the loader reads it on a first load); without it the loader's metadata cache entry
    is written instead. ``permuted``: q/k rows in llama.cpp's Llama order (quantized formats only)."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

    model = make(arch) if model is None else model
    cfg = model.config
    gguf_arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    table = get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    writer = GGUFWriter(str(path), arch)
    if header is not None:
        header(writer, cfg)
    i = 0
    for hf, p in model.named_parameters():
        module, _, suffix = hf.rpartition(".")
        name = f"{table.get_name(module)}.{suffix}"
        w = p.detach().numpy().astype(np.float32)
        if w.ndim == 2:
            fmt = formats[i % len(formats)]
            i += 1
            qtype = GGMLQuantizationType[fmt]
            if fmt == "IQ4_NL":
                data = random_blocks(fmt, *w.shape, i)
                data.reshape(-1, 18)[:, :2] = np.full(data.size // 18, np.abs(w).max() / 127,
                                                      np.float16).view(np.uint8).reshape(-1, 2)
            else:
                data = quantize(w, qtype)
            back = dequantize(data, qtype).reshape(w.shape)
            if permuted and module.endswith(("q_proj", "k_proj")):
                data = quantize(_permute(back, cfg.num_attention_heads if module.endswith("q_proj")
                                         else cfg.num_key_value_heads), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            back = w
            # Gemma's files hold its norms as 1 + weight (llama.cpp's converter; the loader takes 1 off)
            writer.add_tensor(name, w + 1 if arch.startswith("gemma") and "norm" in name else w)
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if header is None:
        _write_meta(path, cfg)
    return model.eval()


@needs_kernels
def test_a_phi3_gguf_with_fused_qkv_and_gate_up_runs_in_its_codes(tmp_path):
    """Phi-3 keeps q/k/v and gate/up each in one matrix (attn_qkv, ffn_up): loaded as they are, the
    engine's native step reads the fused q/k/v and the gate and up halves as row views (no copy)."""
    path = tmp_path / "tiny-phi3.gguf"
    ref = write_arch_gguf(path, "phi3")
    model, _, report = load_quantized(path)
    assert set(report.formats) >= {"Q8_0", "Q4_1", "IQ4_NL"}
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=40)
    assert engine.kernel_report()["step"] == "native"
    gate_up = model.model.layers[0].mlp.gate_up_proj.q
    gate, up, _ = engine.plans[0].ffn.quant
    assert gate.codes.data_ptr() == gate_up.codes.data_ptr() and up.shape == (gate_up.shape[0] // 2, gate_up.shape[1])
    fp = Engine(ref, None, dtype=torch.float32, max_seq_len=40)
    tokens = torch.randint(0, ref.config.vocab_size, (24,))
    assert engine.teacher_forced(tokens, hire=False)[0] == fp.teacher_forced(tokens, hire=False)[0]


@needs_kernels
def test_a_gemma2_gguf_decodes_with_its_soft_caps_like_the_float32_model(tmp_path):
    """Gemma 2 (soft-capped attention scores and logits, local and global layers): the file's codes
    against the float32 model of its values, natively and eagerly, HiRE head included."""
    path = tmp_path / "tiny-gemma2.gguf"
    ref = write_arch_gguf(path, "gemma2")
    model, _, report = load_quantized(path)
    assert model.config.attn_logit_softcapping == ref.config.attn_logit_softcapping
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=48)
    assert engine.kernel_report()["step"] == "native" and engine.attention_softcap and engine.logit_map is not None
    eager = Engine(model, None, dtype=torch.float32, max_seq_len=48, fused=False)
    fp = Engine(ref, None, dtype=torch.float32, max_seq_len=48)
    tokens = torch.randint(0, ref.config.vocab_size, (40,))  # past the 32-token sliding window
    want = fp.teacher_forced(tokens, hire=False)[0]
    assert engine.teacher_forced(tokens, hire=False)[0] == want
    assert eager.teacher_forced(tokens, hire=False)[0] == want
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=ref.config.vocab_size, proxy="int8"), ffn=FFNConfig(enabled=False))
    hire_engine = Engine(load_quantized(path)[0], cfg, dtype=torch.float32, max_seq_len=48)
    assert hire_engine.teacher_forced(tokens, hire=True)[0] == want


def write_full_gguf(path, arch: str, extra=None):
    """A tiny ``arch`` model as a GGUF with the metadata llama.cpp's converter writes (config keys, a
    gpt2-type tokenizer; q/k rows permuted where its converter permutes them), for the loader's real
    first read; its matrices Q8_0, the rest F32; ``extra(writer)`` adds keys. Returns the float32
    model of the file's values."""
    from hire.quant.load import GGUF_EXTRA_ARCHITECTURES

    model = make(arch)
    if arch == "smollm3":  # the file cannot say which layers skip RoPE: llama.cpp's default (every 4th)
        model.config.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(model.config.num_hidden_layers)]
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.use_rope = model.config.no_rope_layers[i]

    def header(writer, cfg):
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        writer.add_vocab_size(cfg.vocab_size)
        if arch == "granite":
            writer.add_attention_scale(cfg.attention_multiplier)
            writer.add_embedding_scale(cfg.embedding_multiplier)
            writer.add_residual_scale(cfg.residual_multiplier)
            writer.add_logit_scale(cfg.logits_scaling)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
        writer.add_token_types([1] * cfg.vocab_size)
        writer.add_token_scores([0.0] * cfg.vocab_size)
        writer.add_token_merges([])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        if extra is not None:
            extra(writer)

    return write_arch_gguf(path, arch, ("Q8_0",), model=model, header=header,
                           permuted=GGUF_EXTRA_ARCHITECTURES[arch][1])


@needs_kernels
@pytest.mark.parametrize("arch", ["smollm3", "olmo2", "granite"])
def test_architectures_transformers_gguf_table_lacks_load_from_their_metadata(arch, tmp_path, monkeypatch):
    """SmolLM3, OLMo 2 and Granite files: the loader registers them in transformers' GGUF tables as
    llama.cpp writes them (Granite's multipliers, Llama's q/k permutation where its converter applies
    it) and they load, from a first read of their metadata, into their codes and the engine."""
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{arch}.gguf"
    ref = write_full_gguf(path, arch)
    model, tokenizer, report = load_quantized(path)
    assert model.config.model_type == arch and "Q8_0" in report.formats
    if arch == "granite":
        assert (model.config.embedding_multiplier, model.config.logits_scaling) == (3.0, 2.0)
    ids = assert_decodes_like(model, ref)
    # the float path (--dequantized): transformers dequantizes the same file
    from transformers import AutoModelForCausalLM

    from hire.models.cache import convert_gguf

    convert_gguf(path, tmp_path / "float")
    floated = AutoModelForCausalLM.from_pretrained(tmp_path / "float", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(floated(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_olmo3_file_is_refused_rather_than_read_without_its_sliding_window(tmp_path, monkeypatch):
    """llama.cpp writes OLMo 3 as olmo2 plus sliding-window keys; an OLMo 2 config would drop them."""
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-olmo3.gguf"
    write_full_gguf(path, "olmo2", extra=lambda writer: writer.add_sliding_window(8))
    with pytest.raises(UnsupportedGGUF, match="OLMo 3"):
        load_quantized(path)


def test_a_gemma2_file_s_soft_caps_and_attention_scale_reach_the_config():
    """transformers' GGUF table leaves them out: the loader reads llama.cpp's keys (the 2B's values
    here; a 27B's 46 layers take hidden / heads as the attention scale)."""
    from transformers import Gemma2Config

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    reader = SimpleNamespace(fields={"gemma2.attn_logit_softcapping": Field(50.0),
                                     "gemma2.final_logit_softcapping": Field(30.0)})
    config = Gemma2Config(attn_logit_softcapping=None, final_logit_softcapping=None, head_dim=256,
                          hidden_size=2304, num_attention_heads=8, num_hidden_layers=26)
    complete_gemma2_config(config, reader)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.query_pre_attn_scalar) == (50.0, 30.0, 256)
    big = Gemma2Config(head_dim=128, hidden_size=4608, num_attention_heads=32, num_hidden_layers=46)
    complete_gemma2_config(big, SimpleNamespace(fields={}))
    assert big.query_pre_attn_scalar == 144


def _llama3_reference(ref):
    """``ref`` with transformers' own Llama 3 rotary frequencies (rope_type llama3), and the factors
    llama.cpp's converter writes for them as ``rope_freqs.weight`` (default / llama3, per frequency)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = copy.deepcopy(ref.config)
    # an original context of 64 positions: this tiny model's frequencies span all three of llama3's bands
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    scaled = LlamaRotaryEmbedding(cfg)
    factors = (ref.model.rotary_emb.inv_freq / scaled.inv_freq).numpy()
    assert (factors > 1.5).any() and (factors == 1).any()  # scaled, smoothed and kept frequencies
    ref.model.rotary_emb = scaled
    return ref, factors


@needs_kernels
def test_a_gguf_s_rope_frequency_factors_are_applied_on_both_paths(tmp_path):
    """A Llama 3.1+ GGUF carries its RoPE scaling as rope_freqs.weight, which transformers' config of the
    file leaves out: the codes path and the float copy (convert_gguf -> load_dir) both apply it, and
    compute what transformers' llama3 rotary computes."""
    from hire.models.cache import _rope_freqs
    from hire.models.load import load_dir

    path = tmp_path / "llama3.gguf"
    ref, _ = write_gguf(path)
    ref, factors = _llama3_reference(ref)
    path.unlink()
    write_gguf(path, extra={"rope_freqs.weight": factors})
    model, _, _ = load_quantized(path)
    assert model.config.rope_freqs == pytest.approx(factors.tolist())
    ids = torch.randint(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=48)
    fp = Engine(ref, None, dtype=torch.float32, max_seq_len=48)
    tokens = torch.randint(0, ref.config.vocab_size, (40,))
    assert engine.teacher_forced(tokens, hire=False)[0] == fp.teacher_forced(tokens, hire=False)[0]
    # the float copy: convert_gguf reads the factors from the file and saves them on the config
    # (transformers' reading of the file is not part of this test: the file has no metadata), and
    # load_dir applies them to what it loads
    assert np.array_equal(_rope_freqs(path), factors)
    plain, _ = write_gguf(tmp_path / "plain.gguf")  # the same weights, default frequencies
    plain.config.rope_freqs = factors.tolist()
    plain.save_pretrained(tmp_path / "float")
    _write_meta(tmp_path / "plain.gguf", plain.config)  # its tokenizer, for load_dir
    from hire.quant.load import meta_entry

    for f in meta_entry(tmp_path / "plain.gguf").glob("tokenizer*"):
        (tmp_path / "float" / f.name).write_bytes(f.read_bytes())
    float_model, _ = load_dir(tmp_path / "float")
    with torch.no_grad():
        torch.testing.assert_close(float_model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_rope_frequency_factors_that_do_not_match_the_model_are_refused(tmp_path):
    path = tmp_path / "bad-rope.gguf"
    write_gguf(path, extra={"rope_freqs.weight": np.ones(3, np.float32)})
    with pytest.raises(UnsupportedGGUF, match=r"8 rotary frequencies, but the model file has 3 RoPE frequency factors"):
        load_quantized(path)


def test_a_quantized_head_s_fingerprint_is_the_float_head_s_without_dequantizing_it_whole(small_gguf, monkeypatch):
    """The proxy and timing caches key on the head's fingerprint: taken block by block from the codes,
    it is the string the whole dequantized head gives (so no cache entry changes)."""
    from hire.calibrate import proxy_cache
    from hire.calibrate.states import head_weight

    model, _, _ = load_quantized(small_gguf[0])
    for samples, rows in ((65536, 4096), (1000, 7), (777, 50)):  # steps of 1, 24 and 31 across blocks of rows
        monkeypatch.setattr(proxy_cache, "FINGERPRINT_SAMPLES", samples)
        monkeypatch.setattr(proxy_cache, "FINGERPRINT_ROWS", rows)
        assert proxy_cache.head_fingerprint(model) == proxy_cache.weight_fingerprint(head_weight(model))


def test_16_bit_matrices_stay_16_bit_beside_the_codes(tmp_path):
    path = tmp_path / "f16.gguf"
    ref, _ = write_gguf(path, overrides={"blk.0.attn_k.weight": "F16", "blk.1.ffn_up.weight": "BF16"})
    model, _, report = load_quantized(path)
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.float16
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, ref.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=2e-3, atol=2e-3)  # x cast to 16 bits
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=32)
    assert engine.kernel_report()["step"] == "eager (q/k/v projections mixed between GGUF codes and 16-bit weights)"
    assert len(engine.generate(ids[0], 4, hire=False).token_ids) == 4


def test_an_unsupported_block_format_names_the_tensor_and_the_format(tmp_path):
    path = tmp_path / "q81.gguf"
    write_gguf(path, overrides={"blk.0.ffn_up.weight": "Q8_1"})
    with pytest.raises(UnsupportedGGUF, match=r"q81\.gguf: tensor blk\.0\.ffn_up\.weight is Q8_1; HiRE runs"):
        load_quantized(path)


def test_a_truncated_gguf_names_the_file(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.gguf is (truncated|a corrupt or truncated GGUF)"):
        load_quantized(path)


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_quantized(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "missing.gguf")


def test_a_tensor_the_config_does_not_expect(tmp_path):
    path = tmp_path / "missing-tensor.gguf"
    write_gguf(path, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(UnsupportedGGUF, match="lacks tensors"):
        load_quantized(path)


def test_a_first_load_parses_the_gguf_header_once(tmp_path, monkeypatch):
    """The metadata's first read (config, tokenizer, tensor table) constructs one ``gguf`` reader of the
    file, shared with transformers' AutoConfig and AutoTokenizer (each parses the whole header on its
    own otherwise: three parses of SmolLM2's 49k-token vocabulary), and leaves ``gguf`` as it was."""
    import gguf

    from hire.models import BUILTIN_MODELS, ModelPackageMissing
    from hire.quant.load import _meta_dir

    try:
        path = BUILTIN_MODELS["smollm2-135m"].locate()
    except ModelPackageMissing as err:
        pytest.skip(str(err))
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    real, opened = gguf.GGUFReader, []

    class Counting(real):
        def __init__(self, file, *args, **kwargs):
            opened.append(Path(file).resolve())
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    entry = _meta_dir(path)
    assert opened == [path.resolve()]
    assert gguf.GGUFReader is Counting  # restored after the block
    table = json.loads((entry / TABLE).read_text())
    assert len(table) == 272 and table[0]["name"] == "token_embd.weight"
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(entry).model_type == "llama"
    assert AutoTokenizer.from_pretrained(entry)("Hello world").input_ids == [19556, 905]
