"""The native gather-GEMV kernels against their eager meaning, the layers and engine that use
them, and their build (a stale lock, a broken source under CI)."""

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from hire import native
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.engine.sampling import sample
from hire.errors import HireError
from hire.native import build
from hire.native import ops as native_ops
from hire.patch import hire_layers, sparsify_
from hire.proxies import LowRankProxy
from hire.proxies.lowrank import reference_block_select
from tiny_models import make

ROOT = Path(__file__).resolve().parents[1]
BUILT = native.available()
# Without the kernels their tests skip, except under CI, where test_kernels_are_built fails instead:
# a suite must not go green on a broken build by testing only the eager path.
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"native kernels: {native.unavailable_reason()}")


def test_kernels_are_built():
    if BUILT:
        assert native.unavailable_reason() is None and (native.build_dir() / build.BUILT_MARK).exists()
    elif native.explicitly_disabled() or not build.under_ci():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    else:
        pytest.fail(f"CI is set and the native kernels did not build: {native.unavailable_reason()}. "
                    "CI must test them: install a C++ compiler and ninja, or fix the source.", pytrace=False)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.int8: 1e-5}


def _case(seed, n, d, c, parts, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, parts * d, generator=g)
    w = torch.randint(-127, 128, w.shape, generator=g, dtype=torch.int8) if dtype == torch.int8 else w.to(dtype)
    x = torch.randn(1, d, generator=g).to(torch.float16)
    idx = torch.randint(0, n, (c,), generator=g)  # repeats allowed
    return w, x, idx


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 80), st.integers(0, 90),
       st.sampled_from(DTYPES), st.sampled_from([None, "silu", "gelu_tanh", "gelu", "relu"]), st.sampled_from([1, 2]))
def test_rows_dot_matches_eager(seed, n, d, c, dtype, act, parts):
    w, x, idx = _case(seed, n, d, c, parts, dtype)
    got = native.rows_dot(x, w, idx, parts=parts, act=act)
    want = native.reference_rows_dot(x, w, idx, parts=parts, act=act)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * d)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 90), st.integers(1, 80), st.floats(0.0, 1.0), st.sampled_from(DTYPES),
       st.sampled_from(["silu", "gelu_tanh", "gelu", "relu"]), st.sampled_from([1, 2]))
def test_ffn_rows_match_eager(seed, neurons, d, share, dtype, act, parts):
    """The decode step's FFN kernel (one contiguous block per neuron, neurons split across threads,
    vectorised activations) against its eager meaning, on any shape, dtype and activation."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(neurons, (parts + 1) * d, generator=g).to(dtype)
    x = torch.randn(1, d, generator=g) * 2
    c = round(share * neurons)
    idx = None if c == 0 else torch.randperm(neurons, generator=g)[:c].sort().values
    got = native.ffn_rows(x, rows, idx, act, parts)
    want = native.reference_ffn_rows(x, rows, idx, act, parts)
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale * 4)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([64, 128, 192, 576, 640]), st.sampled_from([1, 2]),
       st.sampled_from(["silu", "gelu_tanh", "relu"]), st.floats(0.01, 100.0))
@example(1, 1, 64, 2, "gelu_tanh", 1.0)  # the reference's gelu_tanh cancels (see _int4_rounding)
def test_int4_estimates_match_eager(seed, neurons, d, parts, act, magnitude):
    from hire.proxies.quantized_matrix import QuantizedMatrix

    g = torch.Generator().manual_seed(seed)
    matrix = QuantizedMatrix.from_weight(torch.randn(parts * neurons, d, generator=g), bits=4, group_size=64)
    x = torch.randn(1, d, generator=g) * magnitude
    got = native.int4_estimates(x, matrix.packed, matrix.scales, 64, parts, act)
    want = native.reference_int4_estimates(x, matrix.packed, matrix.scales, 64, parts, act)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(want.abs().max().item(), 1e-3)
                               + _int4_rounding(x, matrix, parts, act).max().item())


def _int4_rounding(x: torch.Tensor, matrix, parts: int, act: str) -> torch.Tensor:
    """A bound on int4_estimates' float32 rounding: the kernel adds the groups' scaled integer dots in
    float32, so each part's error scales with the sum of those terms' magnitudes (not with the result,
    which may cancel), and the activation carries it on (its change over that error, evaluated).
    Seed 1, one gated gelu_tanh neuron, d 192, magnitude 10: result 6.5e-3, kernel - reference 7.7e-7.
    # x: (1, d) -> (n,)"""
    from hire.native.ops import EAGER_ACTIVATIONS, quantize_activation

    codes, scale = quantize_activation(x)
    w = torch.stack(((matrix.packed & 0x0F).long() - 8, (matrix.packed >> 4).long() - 8), -1).reshape(matrix.packed.shape[0], -1)
    xq = torch.zeros(w.shape[1], dtype=torch.int64)
    xq[: codes.numel()] = codes.long()
    groups = (w * xq).reshape(w.shape[0], -1, 64).sum(-1).double() * matrix.scales.double() * scale  # (P n, G)
    s, size = groups.sum(-1).reshape(parts, -1), groups.abs().sum(-1).reshape(parts, -1)  # (parts, n)
    err = 4 * groups.shape[1] * 2.0**-24 * size  # float32 sums of G terms, and the scale products
    f = EAGER_ACTIVATIONS[act]
    a = f(s[0])
    da = torch.maximum((f(s[0] + err[0]) - a).abs(), (f(s[0] - err[0]) - a).abs())  # act's change over the error
    if act == "gelu_tanh":  # the reference's own: 0.5 v (1 + tanh(y)) in float32 cancels where tanh(y) is near -1
        # (the kernel's v / (1 + exp(-2 y)) does not). Seed 1, one gated neuron, d 64: gate -4.61, reference
        # gelu -2.748e-6, float64 -2.698e-6, kernel -2.698e-6
        da = da + 0.5 * s[0].abs() * 2.0**-23
    if parts == 1:
        return da
    return da * s[1].abs() + (a.abs() + da) * err[1]


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 80), st.integers(0, 90))
def test_rows_dot_int8_with_row_scales(seed, n, d, c):
    w, x, idx = _case(seed, n, d, c, 1, torch.int8)
    scales = torch.rand(n) / 100
    torch.testing.assert_close(native.rows_dot(x, w, idx, scales), native.reference_rows_dot(x, w, idx, scales),
                               rtol=1e-5, atol=1e-4)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 100), st.integers(0, 90), st.sampled_from(DTYPES))
def test_rows_axpy_matches_eager(seed, n, d, c, dtype):
    w, _, idx = _case(seed, n, d, c, 1, dtype)
    a = torch.randn(c, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(native.rows_axpy(w, idx, a), native.reference_rows_axpy(w, idx, a),
                               rtol=TOL[dtype], atol=TOL[dtype] * max(c, 1))


@needs_kernels
def test_all_rows_equal_the_dense_product():
    w = torch.randn(300, 2 * 96).half()
    x = torch.randn(1, 96).half()
    full = (w.float().view(300, 2, 96) @ x.float()[0])  # (300, 2)
    torch.testing.assert_close(native.rows_dot(x, w, torch.arange(300), parts=2), full, rtol=1e-5, atol=1e-4)
    a = torch.randn(300)
    torch.testing.assert_close(native.rows_axpy(w, torch.arange(300), a), a @ w.float(), rtol=1e-5, atol=1e-3)


@needs_kernels
def test_bad_input_is_refused_clearly():
    w, x = torch.randn(10, 8), torch.randn(1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        native.rows_dot(x, w, torch.tensor([3, 10]))
    with pytest.raises(RuntimeError, match="out of range"):
        native.rows_axpy(w, torch.tensor([-1]), torch.ones(1))
    with pytest.raises(RuntimeError, match="x has 7 elements"):
        native.rows_dot(torch.randn(1, 7), w, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="int64"):
        native.rows_dot(x, w, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="not 3 parts"):
        native.rows_dot(x, w, torch.tensor([0]), parts=3)
    with pytest.raises(RuntimeError, match="per-row scales"):
        native.rows_dot(x, w.to(torch.int8), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="a has 2 weights for 1 rows"):
        native.rows_axpy(w, torch.tensor([0]), torch.ones(2))
    with pytest.raises(ValueError, match="act must be one of"):
        native.rows_dot(x, w, torch.tensor([0]), act="tanh")


def test_activation_name_probes_the_function():
    assert native.activation_name(torch.nn.SiLU()) == "silu"
    assert native.activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert native.activation_name(F.gelu) == "gelu"
    assert native.activation_name(torch.relu) == "relu"
    assert native.activation_name(torch.tanh) is None


# Native and eager decode both accumulate in float32 and round once to the layer's dtype; they
# differ only in summation order (SIMD lanes against BLAS blocking), ~1e-7 relative. In float32
# that is the tolerance; in float16 the final rounding can then land one ulp apart (2**-10
# relative at most), and near-zero outputs of cancelling sums keep an absolute 1e-4.
LAYER_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2**-10, atol=1e-4)}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("oversample", [1.0, 1.5])
def test_ffn_decode_native_equals_eager(arch, oversample, dtype):
    model = make(arch, seed=4)
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.4, oversample=oversample)))
    x = torch.randn(1, model.config.hidden_size).to(dtype)
    for ffn in hire_layers(model)[1]:
        ffn.prepare_decode(dtype)
        plan = ffn.decode_plan()
        assert plan.fused == (plan.native_act is not None and oversample == 1.0)
        got = ffn.decode(x)
        assert got.dtype == dtype
        unfused = replace(plan, fuse=False)  # the unfused native kernels
        torch.testing.assert_close(got, unfused.decode(x), **LAYER_TOL[dtype])
        eager = replace(plan, fuse=False, native_act=None)  # the eager path
        torch.testing.assert_close(got, eager.decode(x), **LAYER_TOL[dtype])
        assert (plan.native_act is not None) == (arch != "gpt2")  # GPT-2's c_fc has a bias: eager path


@needs_kernels
def test_ffn_decode_refuses_bad_shapes():
    rows = torch.randn(16, 3 * 8)
    with pytest.raises(RuntimeError, match="proxy scores have 16 values, expected 32"):
        native.ffn_decode(torch.randn(1, 16), torch.randn(1, 8), rows, 4, "silu", True)
    with pytest.raises(RuntimeError, match=r"count must be in \[1, 16\]"):
        native.ffn_decode(torch.randn(1, 32), torch.randn(1, 8), rows, 17, "silu", True)
    with pytest.raises(RuntimeError, match="the FFN rows are 20 wide; expected 3 x 8"):
        native.ffn_decode(torch.randn(1, 32), torch.randn(1, 8), rows[:, :20], 4, "silu", True)


@needs_kernels
def test_row_kernels_read_views_with_a_row_stride():
    """The FFN's input and output rows are views of one neuron-major buffer."""
    rows = torch.randn(40, 3 * 16).half()
    x, idx, a = torch.randn(1, 16).half(), torch.tensor([3, 0, 39, 7]), torch.randn(4)
    inputs, outputs = rows[:, :32], rows[:, 32:]
    torch.testing.assert_close(native.rows_dot(x, inputs, idx, parts=2, act="silu"),
                               native.reference_rows_dot(x, inputs, idx, parts=2, act="silu"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native.rows_axpy(outputs, idx, a), native.reference_rows_axpy(outputs, idx, a),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        native.rows_axpy(rows.t(), idx, a)


@needs_kernels
def test_ffn_decode_selects_what_select_neurons_selects_ties_included():
    """Scores on a coarse grid tie often: the kernel takes the lowest indices first, like hire.topk."""
    from hire.topk import select_neurons

    g = torch.Generator().manual_seed(0)
    for count in (1, 7, 20, 31, 32):
        rows = torch.randn(32, 3 * 8, generator=g)
        scores = torch.randint(-3, 4, (1, 64), generator=g).float()  # few distinct estimates
        x = torch.randn(1, 8, generator=g)
        est = (F.relu(scores[0, :32]) * scores[0, 32:]).abs()
        want = native.reference_ffn_rows(x, rows, select_neurons(est, count), "relu", 2)
        torch.testing.assert_close(native.ffn_decode(scores, x, rows, count, "relu", True), want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_decode_native_equals_eager(dtype):
    model = make("llama", seed=2)
    sparsify_(model, HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8", group_size=4096), ffn=FFNConfig(enabled=False)))
    head = hire_layers(model)[0]
    head.prepare_decode(dtype)
    h = torch.randn(1, model.config.hidden_size).to(dtype)
    logits, idx = head.decode(h)
    assert head.native_rows
    head.native_rows = False  # as a head prepared without the kernels
    want, want_idx = head.decode(h)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(logits, want, **LAYER_TOL[dtype])


def _decode_trace(engine: Engine, prompt: torch.Tensor, steps: int, feed: list[int] | None = None):
    """Greedy HiRE decode: the token and candidate logits of each step. With ``feed``, step i's
    input is feed[i] rather than the token just picked, so two engines see the same history."""
    tokens, logits = [], []
    with torch.inference_mode():
        hidden = engine.forward(prompt, 0, hire=False)
        for i in range(steps):
            step_logits, idx = engine.logits(hidden, hire=True)  # (1, k'), (1, k')
            token = sample(step_logits, idx)
            tokens.append(int(token))
            logits.append((step_logits.float(), idx))
            hidden = engine.forward(token if feed is None else torch.tensor([feed[i]]), prompt.numel() + i, hire=True)
    return tokens, logits


# the int8 head: one proxy pass over the vocabulary; the cascade: a low-rank pass, then its survivors
# rescored by an int8 copy read row by row (QuantizedGEMV.rows: native kernel or its float32 reference)
HEADS = {"int8": HeadConfig(k=5, candidates=64, proxy="int8", group_size=1024),
         "cascade": HeadConfig(k=5, candidates=64, proxy="cascade", rank=16, bits=8, group_size=64,
                               stage_candidates=128)}


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("oversample", [1.0, 1.5])  # the fused FFN kernel, and the unfused ones
@pytest.mark.parametrize("head", sorted(HEADS))
def test_engine_float16_decodes_the_same_tokens_with_and_without_the_kernels(arch, oversample, head):
    """The engine's default dtype: with the kernels or on the eager fallback (a machine without a
    compiler), greedy decoding gives the same tokens, and the same logits within 4 float16 ulps at
    the logits' scale (~1 here): each layer's output may round one ulp apart (see LAYER_TOL), and
    the later float16 layers carry such a difference on (measured: at most 2**-11)."""
    cfg = HiReConfig(head=HEADS[head], ffn=FFNConfig(density=0.5, oversample=oversample))
    lowrank = None
    if head == "cascade":  # the low-rank stage from the head's SVD (no calibration text needed here)
        lowrank = LowRankProxy.from_weight(make(arch, seed=3).get_output_embeddings().weight.detach(), 16)
    # the eager step on both sides: its row kernels against their fallback (tests/test_plan.py holds
    # the native step, which keeps activations in float32, to this eager step)
    fast = Engine(make(arch, seed=3), cfg, head_proxy=lowrank, max_seq_len=64, fused=False)
    with native.disabled():  # layers prepared here take the eager path for good
        eager = Engine(make(arch, seed=3), cfg, head_proxy=lowrank, max_seq_len=64)
    assert fast.dtype == eager.dtype == torch.float16
    assert fast.head.native_rows and all(f.decode_plan().native_act for f in fast.ffns)
    assert not eager.head.native_rows and not any(f.decode_plan().native_act for f in eager.ffns)
    prompt = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11])
    tokens, logits = _decode_trace(fast, prompt, 20)
    eager_tokens, eager_logits = _decode_trace(eager, prompt, 20, feed=tokens)
    assert eager_tokens == tokens
    for (got, idx), (want, want_idx) in zip(logits, eager_logits):
        # the head proxy reads a hidden state that may differ by an ulp: compare the candidates both
        # paths scored (all of them on this machine), which must include the fast path's top k
        common = torch.tensor(sorted(set(idx[0].tolist()) & set(want_idx[0].tolist())))
        top = idx[0, got[0].topk(cfg.head.k).indices]
        assert torch.isin(top, common).all()
        torch.testing.assert_close(_at(got, idx, common), _at(want, want_idx, common), rtol=2**-8, atol=2**-8)


def _at(logits: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The candidate logits of ``tokens`` (all among the candidates).  # (1, k'), (1, k'), (m,) -> (m,)"""
    order = idx[0].argsort()
    return logits[0, order[torch.searchsorted(idx[0, order], tokens)]]


# --- the other SIMD paths, built beside the default one ------------------------------------------
# -march=native picks the widest path this CPU has; the narrower ones are built as variants (their
# ops under torch.ops.hire_<variant>) and held to the same eager references and tolerances.

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return set()


CPU_FLAGS = _cpu_flags()
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2 = X86 and {"avx2", "fma", "f16c"} <= CPU_FLAGS
# variant -> (its extra compiler flags, whether this machine can build and run it)
AVX512_NO_VNNI = X86 and {"avx512f", "avx512bw", "avx512vl"} <= CPU_FLAGS  # (Skylake-SP: AVX-512 without VNNI)
VARIANTS = {"avx2": (("-mno-avx512f",), AVX2), "avx512novnni": (("-mno-avx512vnni",), AVX512_NO_VNNI),
            "scalar": (("-mno-avx",), X86)}


def test_simd_path_follows_the_cpu():
    if not BUILT:
        assert native.simd_path() is None
        return
    if X86 and "avx512f" in CPU_FLAGS:
        assert native.simd_path() == "avx512"
    elif AVX2:
        assert native.simd_path() == "avx2"
    else:
        assert native.simd_path() in ("avx512", "avx2", "scalar")  # not an x86 /proc/cpuinfo to read


@pytest.fixture(scope="module", params=["avx2", pytest.param("avx512novnni", marks=pytest.mark.slow),
                                        pytest.param("scalar", marks=pytest.mark.slow)])
def variant(request):
    """(name, torch.ops.hire_<name>): the kernels built with the variant's flags (once per machine)."""
    name = request.param
    flags, runs_here = VARIANTS[name]
    if not (BUILT and runs_here):
        pytest.skip(f"the {name} build needs the default build and an x86 CPU with its instructions")
    build.build_variant(name, flags)
    return name, getattr(torch.ops, build.variant_namespace(name))


def _on(library):
    """The hire.native functions run the variant's ops inside this block (same argument handling)."""
    return mock.patch.object(native_ops, "_ops", lambda: library)


def test_a_variant_takes_its_simd_path(variant):
    name, library = variant
    assert library.simd_path() == {"avx512novnni": "avx512"}.get(name, name)  # (simd_path names the register width)
    with pytest.raises(ValueError, match="Python identifier"):
        build.build_variant("no-dashes")


SIZES = [(1, 1, 0), (9, 7, 5), (30, 8, 12), (40, 16, 40), (70, 17, 90), (50, 33, 64), (64, 80, 70)]  # (n, d, c)


@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_rows_dot_matches_eager(variant, dtype, parts, act):
    for seed, (n, d, c) in enumerate(SIZES):  # d covers a lane block's tails on 8 and 16 lanes
        w, x, idx = _case(seed, n, d, c, parts, dtype)
        with _on(variant[1]):
            got = native.rows_dot(x, w, idx, parts=parts, act=act)
        want = native.reference_rows_dot(x, w, idx, parts=parts, act=act)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * d)


def test_variant_rows_dot_int8_with_row_scales(variant):
    for seed, (n, d, c) in enumerate(SIZES):
        w, x, idx = _case(seed, n, d, c, 1, torch.int8)
        scales = torch.rand(n, generator=torch.Generator().manual_seed(seed)) / 100
        with _on(variant[1]):
            got = native.rows_dot(x, w, idx, scales)
        torch.testing.assert_close(got, native.reference_rows_dot(x, w, idx, scales), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_rows_axpy_matches_eager(variant, dtype):
    for seed, (n, d, c) in enumerate(SIZES + [(20, 100, 33)]):
        w, _, idx = _case(seed, n, d, c, 1, dtype)
        a = torch.randn(c, generator=torch.Generator().manual_seed(seed + 1))
        with _on(variant[1]):
            got = native.rows_axpy(w, idx, a)
        torch.testing.assert_close(got, native.reference_rows_axpy(w, idx, a), rtol=TOL[dtype], atol=TOL[dtype] * max(c, 1))


def _reference_ffn_decode(scores, x, rows, count, act, gated):
    """What ffn_decode computes, in eager torch: the ``count`` largest |activation| estimates
    (hire.topk.select_neurons), then those neurons' FFN from their rows."""
    from hire.topk import select_neurons

    parts = 2 if gated else 1
    s = scores.reshape(parts, -1).float()
    est = native.EAGER_ACTIVATIONS[act](s[0])
    if gated:
        est = est * s[1]
    return native.reference_ffn_rows(x, rows, select_neurons(est.abs(), count), act, parts)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_ffn_decode_matches_eager(variant, dtype, gated):
    parts = 2 if gated else 1
    for seed, (neurons, d, count) in enumerate([(16, 8, 16), (64, 24, 20), (96, 57, 31)]):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(neurons, (parts + 1) * d, generator=g).to(dtype)
        scores, x = torch.randn(1, parts * neurons, generator=g), torch.randn(1, d, generator=g).to(dtype)
        for act in ("silu", "gelu_tanh", "gelu", "relu"):
            with _on(variant[1]):
                got = native.ffn_decode(scores, x, rows, count, act, gated)
            want = _reference_ffn_decode(scores, x, rows, count, act, gated)
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * (d + count))


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_ffn_rows_match_eager(variant, dtype, parts):
    for seed, (neurons, d, c) in enumerate([(5, 7, 0), (40, 16, 40), (70, 33, 23), (300, 64, 150)]):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(neurons, (parts + 1) * d, generator=g).to(dtype)
        x = torch.randn(1, d, generator=g)
        idx = None if c == 0 else torch.randperm(neurons, generator=g)[:c].sort().values
        for act in ("silu", "gelu_tanh", "gelu", "relu"):
            with _on(variant[1]):
                got = native.ffn_rows(x, rows, idx, act, parts)
            want = native.reference_ffn_rows(x, rows, idx, act, parts)
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * neurons)


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("group", [64, 128])
def test_variant_int4_estimates_match_eager(variant, group, parts):
    """The fused 4-bit proxy: exact integer sums, so only float32 rounding of the scales' products."""
    from hire.proxies.quantized_matrix import QuantizedMatrix

    for seed, (neurons, d) in enumerate([(8, 64), (48, 192), (96, 576), (32, 640)]):  # widths padded to the group
        g = torch.Generator().manual_seed(seed)
        matrix = QuantizedMatrix.from_weight(torch.randn(parts * neurons, d, generator=g), bits=4, group_size=group)
        x = torch.randn(1, d, generator=g) * 3
        for act in ("silu", "gelu_tanh", "relu"):
            with _on(variant[1]):
                got = native.int4_estimates(x, matrix.packed, matrix.scales, matrix.group_size, parts, act)
            want = native.reference_int4_estimates(x, matrix.packed, matrix.scales, matrix.group_size, parts, act)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("parts", [1, 2])
def test_variant_int4_ffn_step_matches_its_parts(variant, parts):
    """The decode step's fused HiRE FFN (estimates, selection, rows in one parallel region) equals
    its eager meaning: reference estimates, select_neurons, reference rows."""
    from hire.proxies.quantized_matrix import QuantizedMatrix
    from hire.topk import select_neurons

    for seed, (neurons, d, keep) in enumerate([(16, 64, 16), (96, 64, 1), (300, 128, 181), (1536, 576, 922)]):
        g = torch.Generator().manual_seed(seed)
        matrix = QuantizedMatrix.from_weight(torch.randn(parts * neurons, d, generator=g), bits=4, group_size=64)
        rows = torch.randn(neurons, (parts + 1) * d, generator=g).half()
        x = torch.randn(1, d, generator=g)
        for act in ("silu", "gelu_tanh"):
            with _on(variant[1]):
                got = native.int4_ffn(x, rows, matrix.packed, matrix.scales, 64, keep, act, parts)
            est = native.reference_int4_estimates(x, matrix.packed, matrix.scales, 64, parts, act)
            want = native.reference_ffn_rows(x, rows, select_neurons(est, keep), act, parts)
            # (the rows are unrelated to the proxy here, so an output can be ~0: the scale floors at 1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1.0))


def test_int4_estimates_track_the_float_proxy():
    """Quantizing x to int8 moves the proxy's estimates by about a percent: the selection barely."""
    if not BUILT:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    from hire.proxies.quantized_matrix import QuantizedMatrix

    g = torch.Generator().manual_seed(0)
    neurons, d = 1536, 576
    matrix = QuantizedMatrix.from_weight(torch.randn(2 * neurons, d, generator=g), bits=4, group_size=64)
    x = torch.randn(1, d, generator=g)
    got = native.int4_estimates(x, matrix.packed, matrix.scales, 64, 2, "silu")
    gate, up = (x @ matrix.dequantize().t())[0].split(neurons)
    exact = (F.silu(gate) * up).abs()
    assert ((got - exact).norm() / exact.norm()).item() < 0.03
    keep = 922
    overlap = set(got.topk(keep).indices.tolist()) & set(exact.topk(keep).indices.tolist())
    assert len(overlap) / keep > 0.98


# (query heads, kv heads, head dim, positions cached, first, end): groups of 1 to 8 query heads per kv head
# (register blocks of 4 or 2 heads and their remainders), head dims on and off 8 and 16 lanes, short
# contexts (one thread), long ones (split into chunks across threads, then merged) and sliding windows
ATTENTION_CASES = [(9, 3, 64, 40, 0, 40), (9, 3, 64, 2100, 0, 2100), (12, 2, 128, 700, 100, 699),
                   (4, 1, 256, 600, 88, 600), (14, 2, 64, 333, 0, 333), (6, 6, 40, 90, 3, 90),
                   (5, 1, 48, 71, 0, 70), (16, 16, 32, 3, 0, 1), (8, 1, 80, 1500, 0, 1450)]


def _attention_case(seed, hq, hkv, hd, seq, dtype):
    g = torch.Generator().manual_seed(seed)
    q = 3 * torch.randn(hq, hd, generator=g)  # peaked softmaxes: the chunks' maxima differ widely
    return q, torch.randn(hkv, seq, hd, generator=g).to(dtype), torch.randn(hkv, seq, hd, generator=g).to(dtype)


def _check_attend(ops, dtype, softcap):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (one core or many: the long contexts still split into chunks)
    try:
        for seed, (hq, hkv, hd, seq, first, end) in enumerate(ATTENTION_CASES):
            q, k, v = _attention_case(seed, hq, hkv, hd, seq, dtype)
            got = native.attend(q, k, v, first, end, hd**-0.5, softcap, ops=ops)
            want = native.reference_attend(q, k, v, first, end, hd**-0.5, softcap)
            assert got.dtype == torch.float32 and got.shape == (hq, hd)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("softcap", [0.0, 20.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attend_matches_eager(dtype, softcap):
    _check_attend(None, dtype, softcap)


@pytest.mark.parametrize("softcap", [0.0, 20.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_attend_matches_eager(variant, dtype, softcap):
    _check_attend(variant[1], dtype, softcap)


@needs_kernels
def test_attend_refuses_bad_shapes():
    q, k, v = torch.randn(4, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    with pytest.raises(RuntimeError, match="one shape"):
        native.attend(q, k, v[:, :9].contiguous(), 0, 9, 0.25)
    with pytest.raises(RuntimeError, match="multiple of 2 heads"):
        native.attend(q[:3], k, v, 0, 10, 0.25)
    with pytest.raises(RuntimeError, match="non-empty range"):
        native.attend(q, k, v, 5, 5, 0.25)
    with pytest.raises(RuntimeError, match="non-empty range"):
        native.attend(q, k, v, 0, 11, 0.25)
    with pytest.raises(RuntimeError, match="share a dtype"):
        native.attend(q, k, v.half(), 0, 10, 0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_gemv_matches_eager(variant, dtype):
    for seed, (n, d) in enumerate([(1, 1), (7, 9), (64, 576), (300, 33)]):
        g = torch.Generator().manual_seed(seed)
        w, x = torch.randn(n, d, generator=g).to(dtype), torch.randn(1, d, generator=g)
        with _on(variant[1]):
            got = native.gemv(x, w)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, (w.float() @ x[0]), rtol=TOL[dtype], atol=TOL[dtype] * d)


@pytest.mark.parametrize("rank", [16, 64, 128])
def test_variant_lowrank_block_topk_selects_what_local_topk_selects(variant, rank):
    """The head's first pass: exact integer sums of the int8 codes with z's int8 codes, so the same
    rows as hire.topk.local_topk over the same scores (random floats: no ties)."""
    for seed, (rows, blocks, per) in enumerate([(256, 16, 1), (4096, 64, 8), (49152, 512, 8)]):
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(-127, 128, (rows, rank), generator=g, dtype=torch.int8)
        scales, z = torch.rand(rows, generator=g) / 100, torch.randn(1, rank, generator=g)
        # a row bias (the proxy's optimism) as large as the scores themselves, so it changes the choice
        bias = (torch.rand(rows, generator=g) * scales * 127 * 40 * rank ** 0.5).half()
        with _on(variant[1]):
            packed = native.pack_lowrank(codes)
            got = native.lowrank_block_topk(z, packed, scales, blocks, per)
            got_bias = native.lowrank_block_topk(z, packed, scales, blocks, per, bias)
        want = native.reference_lowrank_block_topk(z, codes, scales, blocks, per)
        want_bias = native.reference_lowrank_block_topk(z, codes, scales, blocks, per, bias)
        assert got.shape == (blocks * per,) and sorted(got.tolist()) == sorted(want.tolist())
        assert ((got % blocks).bincount(minlength=blocks) == per).all()  # per rows from every block
        assert sorted(got_bias.tolist()) == sorted(want_bias.tolist()) != sorted(want.tolist())


@needs_kernels
def test_lowrank_block_topk_refuses_bad_shapes():
    packed = native.pack_lowrank(torch.zeros(64, 16, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="z has 8 values for a rank of 16"):
        native.lowrank_block_topk(torch.zeros(1, 8), packed, torch.ones(64), 16, 2)
    with pytest.raises(RuntimeError, match="blocks must be a multiple of 16"):
        native.lowrank_block_topk(torch.zeros(1, 16), packed, torch.ones(64), 8, 2)
    with pytest.raises(RuntimeError, match=r"per must be in \[1, 4\]"):
        native.lowrank_block_topk(torch.zeros(1, 16), packed, torch.ones(64), 16, 5)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        native.pack_lowrank(torch.zeros(40, 16, dtype=torch.int8))


@needs_kernels
def test_the_cascade_head_takes_the_fused_first_pass_and_keeps_its_candidates():
    """A Gemma-like head (rank-16 int8 U, block-local first pass): the native first pass picks the
    rows the eager one picks from the same quantized scores, and the head's top-k is unchanged."""
    from hire.proxies import Cascade, QuantizedProxy

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 64, generator=g)
    lowrank = LowRankProxy.from_weight(weight, 16, u_bits=8)
    cascade = Cascade([lowrank, QuantizedProxy.from_weight(weight, bits=8, group_size=64)], [512, 64], blocks=64)
    cascade.prepare_decode(torch.float16)
    assert lowrank.packed is not None
    x = torch.randn(1, 64, generator=g).half()
    fused = cascade.decode_select(x)
    assert lowrank.block_pack(64) is not None  # the first pass ran block by block (z = V x in the kernel)
    first = reference_block_select(x, lowrank._v, lowrank._u.codes, lowrank._u.row_scales, 64, 8)[0]
    sub = cascade.proxies[1].decode_scores_rows(x, first)
    eager = first[sub[0].topk(64, sorted=False).indices]
    assert sorted(fused[0].tolist()) == sorted(eager.tolist())


def test_variant_decode_step_matches_the_default_build(variant):
    """The whole native decode step built for another SIMD path gives the default build's hidden states."""
    from hire.engine.plan import native_steps

    name, _ = variant
    model = make("qwen3", seed=2)
    engine = Engine(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5)),
                    dtype=torch.float16, max_seq_len=32)
    other, reason = native_steps(engine, getattr(torch.classes, build.variant_namespace(name)).DecodeModel)
    assert reason is None
    engine.forward(torch.arange(1, 9), 0, hire=False)
    h = engine.embed(torch.tensor([7])).float()
    for hire in (False, True):
        caches = engine.k_cache.clone(), engine.v_cache.clone()
        want = engine.native_steps[hire].step(h, 8)
        engine.k_cache.copy_(caches[0]), engine.v_cache.copy_(caches[1])
        got = other[hire].step(h, 8)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_disabled_forces_the_eager_path_in_one_process():
    with native.disabled():
        assert not native.available() and not native.usable(torch.zeros(2, 2))
        assert "disabled()" in native.unavailable_reason()
        assert native.explicitly_disabled()
        with pytest.raises(native.NativeUnavailableError, match="unavailable: disabled") as err:
            native.rows_dot(torch.randn(1, 8), torch.randn(4, 8), torch.tensor([1]))
        assert isinstance(err.value, HireError) and isinstance(err.value, RuntimeError)
    assert native.available() == BUILT


# --- the build -------------------------------------------------------------------------------

def test_build_lock_times_out_naming_the_lock_and_the_fix(tmp_path):
    holder = open(tmp_path / build.HIRE_LOCK, "a+")  # another open file: flock conflicts even in one process
    holder.write("4242\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)
    with pytest.raises(native.NativeBuildTimeout) as err:
        with build.build_lock(tmp_path, timeout=0.3):
            pass
    message = str(err.value)
    assert "process 4242" in message and str(tmp_path / build.HIRE_LOCK) in message
    assert "HIRE_NATIVE_BUILD_TIMEOUT" in message and isinstance(err.value, HireError)
    holder.close()  # the holder is gone (as when it dies): the lock is free at once
    with build.build_lock(tmp_path, timeout=0.3):
        assert (tmp_path / build.HIRE_LOCK).read_text().strip() == str(os.getpid())


def test_build_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("HIRE_NATIVE_BUILD_TIMEOUT", raising=False)
    assert build.build_timeout() == build.BUILD_TIMEOUT_S
    monkeypatch.setenv("HIRE_NATIVE_BUILD_TIMEOUT", "2.5")
    assert build.build_timeout() == 2.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("HIRE_NATIVE_BUILD_TIMEOUT", bad)
        with pytest.raises(HireError, match="HIRE_NATIVE_BUILD_TIMEOUT must be a positive number of seconds"):
            build.build_timeout()


def _env(cache: Path, src: Path = ROOT / "src", **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HIRE_NATIVE", "CI", "PYTEST_ADDOPTS")}
    return {**env, "PYTHONPATH": str(src), "HIRE_CACHE": str(cache), **extra}


@needs_kernels
@pytest.mark.parametrize("marked", [True, False], ids=["built", "killed-before-the-mark"])
def test_bench_does_not_hang_on_a_stale_build_lock(tmp_path_factory, model_dir, marked):
    """A build killed mid-way leaves torch's ``lock`` in the build directory, on which
    cpp_extension.load waits forever. A fresh cache holding a copy of this machine's build (so
    nothing compiles) and such a lock: ``hire bench`` finishes on the native kernels. Without the
    ``built`` mark (killed after linking), the build runs again through torch (ninja finds it up to
    date) after the stale lock is removed."""
    cache = tmp_path_factory.mktemp("cache")
    directory = cache / "native" / native.build_dir().name
    shutil.copytree(native.build_dir(), directory)  # copy2 keeps mtimes: ninja sees the build as current
    (directory / build.TORCH_LOCK).write_text("")
    if not marked:
        (directory / build.BUILT_MARK).unlink()
    cmd = [sys.executable, "-m", "hire", "bench", "--model", model_dir, "--tokens", "4", "--rounds", "1",
           "--warmup", "0", "--no-breakdown", "--head-proxy", "int8", "--head-candidates", "64", "--json"]
    try:
        run = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hire bench hung on the stale lock {directory / build.TORCH_LOCK}: {exc.stderr}")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["hire_kernels"]["rows"] == "native"
    assert (directory / build.BUILT_MARK).exists()
    # a marked build is loaded without reading torch's lock; a build through torch removed it first
    assert (directory / build.TORCH_LOCK).exists() == marked
    assert ("building the native kernels" in run.stderr) == (not marked)


@pytest.mark.slow
def test_a_broken_kernel_source_fails_under_ci(tmp_path):
    """What .ci/run's `make test` does with a kernel source that does not compile: the set-up line
    (`python -m hire.native`) and tests/test_native.py fail under CI=true, naming the build error;
    without CI the eager path is used and the set-up line passes."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", copy / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", copy)
    source = copy / "src" / "hire" / "native" / build.SOURCES[0].name
    source.write_text("this is not C++;\n" + source.read_text())  # fails at once (-Wfatal-errors)
    env = _env(tmp_path / "cache", copy / "src", CI="true")

    setup = subprocess.run([sys.executable, "-m", "hire.native"], cwd=copy, env=env, capture_output=True,
                           text=True, timeout=300)
    assert setup.returncode == 1, setup.stdout + setup.stderr
    assert "the build failed" in setup.stdout and "sparse_rows.cpp:1" in setup.stdout
    assert "CI is set: the native kernels must build here" in setup.stderr

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_native.py",
                            "-k", "not broken_kernel_source"], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=300)
    assert tests.returncode == 1, tests.stdout + tests.stderr
    assert "CI is set and the native kernels did not build: the build failed" in tests.stdout
    assert "1 failed" in tests.stdout

    no_ci = subprocess.run([sys.executable, "-m", "hire.native"], cwd=copy, env={**env, "CI": ""},
                           capture_output=True, text=True, timeout=300)
    assert no_ci.returncode == 0 and "unavailable (the build failed" in no_ci.stdout


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_variant_quantized_products_match_eager(variant, fmt, act_bits):
    """qgemv (all and selected rows) and qaxpy of every GGUF format on the variant's SIMD path."""
    from test_quant import FORMATS, _check_products

    cols = FORMATS[fmt].block * (3 if FORMATS[fmt].block == 32 else 1)  # 96 columns: a padded last chunk
    _check_products(fmt, 37, cols, 2, ops=variant[1], act_bits=act_bits)


def test_variant_quantized_decode_step_matches_the_default_build(variant, tmp_path):
    """The decode step over a GGUF's block codes, built for another SIMD path."""
    from hire.engine.plan import native_steps
    from hire.quant import load_quantized
    from test_quant import write_gguf

    name, _ = variant
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    engine = Engine(load_quantized(path)[0], None, dtype=torch.float32, max_seq_len=32)
    other, reason = native_steps(engine, getattr(torch.classes, build.variant_namespace(name)).DecodeModel)
    assert reason is None
    engine.forward(torch.arange(1, 9), 0, hire=False)
    h = engine.embed(torch.tensor([7])).float()
    caches = engine.k_cache.clone(), engine.v_cache.clone()
    want = engine.native_steps[False].step(h, 8)
    engine.k_cache.copy_(caches[0]), engine.v_cache.copy_(caches[1])
    got = other[False].step(h, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
