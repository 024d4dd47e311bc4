"""The native decode step (hire.engine.plan -> native/decode.cpp) against the engine's eager step,
and the engine on every layout it claims, Qwen2's attention biases included."""

import pytest
import torch

from hire import native
from hire.arch import engine_supported
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.engine.plan import layer_plans, native_steps
from tiny_models import ARCHS, VOCAB, make

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11, 64, 2, 33, 120])
ENGINE_ARCHS = [arch for arch in ARCHS if engine_supported(arch)]
needs_kernels = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
# The native step keeps activations in float32 where the eager one rounds them to the weights'
# dtype before each product; the final hidden states then differ by that rounding.
STEP_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _with_biases(model):
    """Qwen2's q/k/v biases are zeros at init: random ones, so that a dropped bias shows."""
    g = torch.Generator().manual_seed(11)
    for layer in model.model.layers:
        attn = layer.self_attn
        projs = (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)  # Phi-3: fused
        for proj in projs:
            if proj.bias is not None:
                with torch.no_grad():
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.5)
    return model


def _engine(arch, config, dtype, seed=5):
    model = _with_biases(make(arch, seed=seed))
    return Engine(model, config, dtype=dtype, max_seq_len=64)


def _steps_agree(engine, hire, dtype, positions=6):
    """Prefill PROMPT, then run the next tokens through both steps from the same cache."""
    engine.forward(PROMPT, 0, hire=False)
    tokens = torch.randint(0, VOCAB, (positions,), generator=torch.Generator().manual_seed(3))
    for i, token in enumerate(tokens):
        pos = PROMPT.numel() + i
        h = engine.embed(token.view(1)).float()
        caches = engine.k_cache.clone(), engine.v_cache.clone()
        fused = engine.native_steps[hire].step(h, pos)
        fused_caches = engine.k_cache.clone(), engine.v_cache.clone()
        engine.k_cache.copy_(caches[0]), engine.v_cache.copy_(caches[1])
        eager = engine.eager_forward(h, pos, hire).float()
        scale = eager.abs().max().item()
        assert (fused - eager).abs().max().item() <= STEP_TOL[dtype] * scale, (pos, hire)
        for got, want in zip(fused_caches, (engine.k_cache, engine.v_cache)):  # the step wrote this position's k, v
            torch.testing.assert_close(got[:, :, pos].float(), want[:, :, pos].float(), rtol=0,
                                       atol=STEP_TOL[dtype] * max(want[:, :, pos].abs().max().item(), 1.0))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_native_dense_step_equals_the_eager_step(arch, dtype):
    engine = _engine(arch, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5)), dtype)
    assert engine.native_steps is not None, engine.native_reason
    assert engine.kernel_report()["step"] == "native"
    _steps_agree(engine, hire=False, dtype=dtype)


@needs_kernels
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_native_hire_step_equals_the_eager_step(arch):
    """The exact proxy in float32: both steps select the same neurons, so they agree closely."""
    config = HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.4, proxy="exact"))
    engine = _engine(arch, config, torch.float32)
    assert [p.ffn.proxy_kind for p in layer_plans(engine)] == ["matrix"] * len(engine.layers)
    _steps_agree(engine, hire=True, dtype=torch.float32)


@needs_kernels
def test_the_int4_proxy_runs_fused_and_keeps_the_tokens_close():
    engine = _engine("llama", HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.9)), torch.float32)
    assert {p.ffn.proxy_kind for p in layer_plans(engine)} == {"int4"}
    assert all(p.ffn.keep == round(0.9 * p.ffn.neurons) for p in layer_plans(engine))
    fused = engine.generate(PROMPT, 12, hire=True).token_ids
    steps, engine.native_steps = engine.native_steps, None
    eager = engine.generate(PROMPT, 12, hire=True).token_ids
    engine.native_steps = steps
    # the two proxies round x differently (int8 codes vs bfloat16) and may pick a neuron or two apart
    assert sum(a == b for a, b in zip(fused, eager)) >= 10


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_k_equal_n_tokens_equal_transformers_with_attention_biases(arch):
    model = _with_biases(make(arch, seed=7))
    want = model.generate(PROMPT[None], max_new_tokens=16, do_sample=False)[0, PROMPT.numel():].tolist()
    engine = Engine(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=1.0)),
                    dtype=torch.float32, max_seq_len=64)
    assert engine.generate(PROMPT, 16, hire=True).token_ids == want
    assert engine.generate(PROMPT, 16, hire=False).token_ids == want
    if arch == "qwen2":
        assert engine.layers[0].qkv_bias is not None and engine.layers[0].qkv_bias.abs().sum() > 0


@needs_kernels
def test_what_the_native_step_cannot_run_keeps_the_eager_step_and_says_why():
    oversampled = _engine("llama", HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5, oversample=1.5)),
                          torch.float32)
    assert oversampled.native_steps is None and "oversampled" in oversampled.native_reason
    assert "oversampled" in oversampled.kernel_report()["step"]
    off = Engine(make("llama"), None, dtype=torch.float32, max_seq_len=32, fused=False)
    assert off.native_steps is None and off.kernel_report()["step"] == "eager (fused=False)"
    with native.disabled():
        steps, reason = native_steps(off)
    assert steps is None and "unavailable" in reason


@needs_kernels
def test_the_decode_model_refuses_bad_layers():
    engine = _engine("llama", None, torch.float32)
    plan = layer_plans(engine)[0]
    def new_step():
        return native.decode_model_class()([engine.n_heads, engine.n_kv, engine.head_dim, engine.hidden], engine.scale,
                                           engine.norm.eps, engine.k_cache, engine.v_cache,
                                           [c for c, _ in engine.rope_tables_f32],
                                           [s for _, s in engine.rope_tables_f32], engine.norm.weight)

    step = new_step()
    tensors, ints = plan.native_args(hire=False)
    gate, up, down = plan.ffn.mats  # the dense FFN: the model's own matrices, no rows
    assert plan.ffn.rows.numel() == 0
    with pytest.raises(RuntimeError, match="qkv must be"):
        step.add_layer([tensors[0][:-1]] + tensors[1:], ints)
    step.add_layer(tensors, ints)
    with pytest.raises(RuntimeError, match="the model has 1 of 2 layers"):
        step.step(torch.zeros(1, engine.hidden), 0)
    step.add_layer(tensors, ints)
    with pytest.raises(RuntimeError, match="layer 0 has no FFN"):
        step.step(torch.zeros(1, engine.hidden), 0)
    with pytest.raises(RuntimeError, match=r"the FFN's down matrix must be \(\d+, \d+\) with contiguous rows"):
        step.set_ffn_matrices(0, gate, up, down.t())
    with pytest.raises(RuntimeError, match="a gate matrix is missing"):
        step.set_ffn_matrices(0, torch.empty(0), up, down)
    with pytest.raises(RuntimeError, match="share one dtype"):
        step.set_ffn_matrices(0, gate, up, down.half())
    with pytest.raises(RuntimeError, match="layer 2 was not added"):
        step.set_ffn_matrices(2, gate, up, down)
    for layer in (0, 1):
        step.set_ffn_matrices(layer, gate, up, down)
    with pytest.raises(RuntimeError, match="outside the cache"):
        step.step(torch.zeros(1, engine.hidden), 64)
    assert torch.isfinite(step.step(torch.zeros(1, engine.hidden), 0)).all()
    sparse = layer_plans(_engine("llama", HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5)),
                                 torch.float32))[0]
    tensors, ints = sparse.native_args(hire=True)
    with pytest.raises(RuntimeError, match=r"keep must be in \[1, "):
        new_step().add_layer(tensors, ints[:4] + [0] + ints[5:])
    fresh = new_step()
    tensors, ints = plan.native_args(hire=False)
    fresh.add_layer(tensors, ints[:4] + [0] + ints[5:])
    with pytest.raises(RuntimeError, match=r"runs dense \(keep 0 of \d+\)"):
        fresh.set_ffn_matrices(0, gate, up, down)


def test_timing_hooks_split_the_step_into_parts():
    engine = _engine("llama", HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8"), ffn=FFNConfig(density=0.5)),
                     torch.float32)
    for steps in (engine.native_steps, None):
        engine.native_steps = steps
        with engine.timed() as spent:
            engine.generate(PROMPT, 6, hire=True)
        assert {"attention", "ffn", "head"} <= set(spent) and all(v > 0 for v in spent.values())
        if steps is not None:  # the fused 4-bit proxy times its estimates and its selection too
            assert 0 < spent["ffn_proxy"] + spent["ffn_select"] < spent["ffn"]
        with engine.timed() as again:
            pass
        assert sum(again.values()) == 0  # each block starts from zero
