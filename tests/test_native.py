"""The native gather-GEMV kernels against their eager meaning, and the layers that use them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from hire import native
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.patch import hire_layers, sparsify_
from tiny_models import make

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.int8: 1e-5}


def _case(seed, n, d, c, parts, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, parts * d, generator=g)
    w = torch.randint(-127, 128, w.shape, generator=g, dtype=torch.int8) if dtype == torch.int8 else w.to(dtype)
    x = torch.randn(1, d, generator=g).to(torch.float16)
    idx = torch.randint(0, n, (c,), generator=g)  # repeats allowed
    return w, x, idx


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 80), st.integers(0, 90),
       st.sampled_from(DTYPES), st.sampled_from([None, "silu", "gelu_tanh", "gelu", "relu"]), st.sampled_from([1, 2]))
def test_rows_dot_matches_eager(seed, n, d, c, dtype, act, parts):
    w, x, idx = _case(seed, n, d, c, parts, dtype)
    got = native.rows_dot(x, w, idx, parts=parts, act=act)
    want = native.reference_rows_dot(x, w, idx, parts=parts, act=act)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * d)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 80), st.integers(0, 90))
def test_rows_dot_int8_with_row_scales(seed, n, d, c):
    w, x, idx = _case(seed, n, d, c, 1, torch.int8)
    scales = torch.rand(n) / 100
    torch.testing.assert_close(native.rows_dot(x, w, idx, scales), native.reference_rows_dot(x, w, idx, scales),
                               rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 70), st.integers(1, 100), st.integers(0, 90), st.sampled_from(DTYPES))
def test_rows_axpy_matches_eager(seed, n, d, c, dtype):
    w, _, idx = _case(seed, n, d, c, 1, dtype)
    a = torch.randn(c, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(native.rows_axpy(w, idx, a), native.reference_rows_axpy(w, idx, a),
                               rtol=TOL[dtype], atol=TOL[dtype] * max(c, 1))


def test_all_rows_equal_the_dense_product():
    w = torch.randn(300, 2 * 96).half()
    x = torch.randn(1, 96).half()
    full = (w.float().view(300, 2, 96) @ x.float()[0])  # (300, 2)
    torch.testing.assert_close(native.rows_dot(x, w, torch.arange(300), parts=2), full, rtol=1e-5, atol=1e-4)
    a = torch.randn(300)
    torch.testing.assert_close(native.rows_axpy(w, torch.arange(300), a), a @ w.float(), rtol=1e-5, atol=1e-3)


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


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("oversample", [1.0, 1.5])
def test_ffn_decode_native_equals_eager(arch, oversample):
    model = make(arch, seed=4)
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.4, oversample=oversample)))
    x = torch.randn(1, model.config.hidden_size)
    for ffn in hire_layers(model)[1]:
        ffn.prepare_decode(torch.float32)
        native_act, fused = ffn._native_act, ffn._fused
        assert fused == (native_act is not None and oversample == 1.0)
        got = ffn.decode(x)
        ffn._fused = False  # the unfused native kernels
        torch.testing.assert_close(got, ffn.decode(x), rtol=1e-5, atol=1e-5)
        ffn._native_act = None  # the eager path
        torch.testing.assert_close(got, ffn.decode(x), rtol=1e-5, atol=1e-5)
        ffn._native_act, ffn._fused = native_act, fused
        assert (native_act is not None) == (arch != "gpt2")  # GPT-2's c_fc has a bias: eager path


def test_ffn_decode_refuses_bad_shapes():
    w_in, w_out = torch.randn(16, 2 * 8), torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="proxy scores have 16 values, expected 32"):
        native.ffn_decode(torch.randn(1, 16), torch.randn(1, 8), w_in, w_out, 4, "silu", True)
    with pytest.raises(RuntimeError, match=r"count must be in \[1, 16\]"):
        native.ffn_decode(torch.randn(1, 32), torch.randn(1, 8), w_in, w_out, 17, "silu", True)
    with pytest.raises(RuntimeError, match="one row per neuron"):
        native.ffn_decode(torch.randn(1, 32), torch.randn(1, 8), w_in, w_out[:8], 4, "silu", True)


def test_head_decode_native_equals_eager():
    model = make("llama", seed=2)
    sparsify_(model, HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8", group_size=4096), ffn=FFNConfig(enabled=False)))
    head = hire_layers(model)[0]
    head.prepare_decode(torch.float32)
    h = torch.randn(1, model.config.hidden_size)
    logits, idx = head.decode(h)
    head._native = False
    want, want_idx = head.decode(h)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
