import pytest
import torch

from hire.arch import ARCHITECTURES, engine_supported
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine, sample
from tiny_models import ARCHS, VOCAB, make

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11, 64, 2, 33, 120])
ENGINE_ARCHS = [arch for arch in ARCHS if engine_supported(arch)]  # driven by hire.arch's table


def test_every_architecture_the_engine_claims_is_tested():
    claimed = {arch for arch in ARCHITECTURES if engine_supported(arch)}
    assert claimed <= set(ENGINE_ARCHS), f"add a tiny model for {claimed - set(ENGINE_ARCHS)} to tests/tiny_models.py"
    assert not engine_supported("gpt2") and not engine_supported("bert")


def all_rows():
    return HiReConfig(head=HeadConfig(k=10, candidates=VOCAB, proxy="int4"), ffn=FFNConfig(density=1.0))


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_k_equal_n_engine_tokens_equal_transformers(arch):
    model = make(arch, seed=3)
    if arch in ("gemma2", "gemma3_text"):
        model.config.sliding_window = 8  # the prompt and the generation cross the window
        for layer in model.model.layers:
            if layer.self_attn.sliding_window:
                layer.self_attn.sliding_window = 8
    want = model.generate(PROMPT[None], max_new_tokens=20, do_sample=False)[0, PROMPT.numel():].tolist()
    engine = Engine(model, all_rows(), dtype=torch.float32, max_seq_len=64)
    assert engine.generate(PROMPT, 20, hire=True).token_ids == want
    assert engine.generate(PROMPT, 20, hire=False).token_ids == want


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
@torch.inference_mode()
def test_engine_logits_equal_transformers(arch):
    """Tokens can agree where a part of an architecture is missing (a NoPE layer rotated, an uncapped
    score): the logits of a decode step after a prefill, native and eager, are transformers' own."""
    model = make(arch, seed=3)
    want = model(PROMPT[None]).logits[0, -1].float()
    for fused in (True, False):
        engine = Engine(model, None, dtype=torch.float32, max_seq_len=64, fused=fused)
        engine.prefill(PROMPT[:-1])
        hidden = engine.forward(PROMPT[-1:], PROMPT.numel() - 1, hire=False)
        got = engine.logits(hidden, hire=False)[0][0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{arch}, fused={fused}")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
@torch.inference_mode()
def test_the_model_and_the_engine_hold_one_copy(arch):
    """The 16-bit path: the model's q, k and v become views of the engine's fused rows, and the native
    step's dense FFN reads the model's own gate, up and down (no neuron-major copy); the model computes
    what it computed before, and the engine what transformers computes."""
    model = make(arch, seed=3)
    want = model(PROMPT[None]).logits[0]
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=64)
    spec = engine.spec
    for i, layer in enumerate(engine.layers):
        attn = getattr(layer.module, spec.attention)
        projections = [spec.qkv] if spec.qkv else [spec.q, spec.k, spec.v]
        for name in projections:
            assert _storage(getattr(attn, name).weight) == _storage(layer.qkv), f"{arch} layer {i}: {name}"
        if engine.plans is not None:
            ffn = engine.plans[i].ffn
            own = {_storage(p) for p in getattr(layer.module, engine.mlp).parameters()}
            assert ffn.rows.numel() == 0 and len(ffn.mats) == ffn.parts + 1, f"{arch} layer {i}"
            assert all(_storage(m) in own for m in ffn.mats), f"{arch} layer {i}: an FFN matrix copied"
    assert engine.plans is not None or not engine.native_steps
    torch.testing.assert_close(model(PROMPT[None]).logits[0], want, rtol=1e-5, atol=1e-5)
    engine.prefill(PROMPT[:-1])
    got = engine.logits(engine.forward(PROMPT[-1:], PROMPT.numel() - 1, hire=False), hire=False)[0][0]
    torch.testing.assert_close(got, want[-1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_a_sparse_ffn_s_weights_are_views_of_its_rows(dtype):
    """With a HiRE FFN the native step reads neuron-major rows [gate_i | up_i | down column i]; the
    model's gate and up become row views of them, and in bfloat16 and float32 its down projection the
    transposed view of their down columns (float16 keeps its own: torch's product with a transposed
    float16 weight is ~80x slower); its dense MLPs compute what they computed."""
    model = make("llama", seed=3).to(dtype)
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = [layer.mlp(x) for layer in model.model.layers]
    engine = Engine(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5)), dtype=dtype,
                    max_seq_len=64)
    assert engine.plans is not None
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for i, layer in enumerate(engine.layers):
        rows = engine.plans[i].ffn.rows
        hire_ffn = getattr(layer.module, engine.mlp)
        mlp = hire_ffn.base_layer
        d = mlp.gate_proj.weight.shape[1]
        assert _storage(mlp.gate_proj.weight) == _storage(rows) == _storage(mlp.up_proj.weight)
        torch.testing.assert_close(mlp.up_proj.weight, rows[:, d : 2 * d], rtol=0, atol=0)
        shared = _storage(mlp.down_proj.weight) == _storage(rows)
        assert shared == (dtype != torch.float16), f"layer {i}: down shared {shared} in {dtype}"
        if shared:
            torch.testing.assert_close(mlp.down_proj.weight, rows[:, 2 * d :].t(), rtol=0, atol=0)
            assert _storage(hire_ffn.weights.w_out_t) == _storage(rows)  # no view left on the old copy
        torch.testing.assert_close(mlp(x), want[i], rtol=tol, atol=tol)
        torch.testing.assert_close(hire_ffn.weights.w_out_t, mlp.down_proj.weight.t(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_hire_decode_path_matches_the_patched_model(arch):
    """Realistic settings: the engine's packed decode layout computes what HiReFFN/HiReLMHead compute."""
    model = make(arch, seed=1)
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8"), ffn=FFNConfig(density=0.5, oversample=1.25))
    engine = Engine(model, cfg, dtype=torch.float32, max_seq_len=64)
    got = engine.generate(PROMPT, 10, hire=True).token_ids
    # the patched HF model, decoding one token at a time through the same layers
    ids = PROMPT[None]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)[0, PROMPT.numel():].tolist()
    assert got == out


@torch.inference_mode()
def test_soft_capped_logits_on_every_head_path():
    """Gemma 2 caps its logits after the head (c tanh(x / c), here c = 1.5 so that it bites): the dense
    head, HiRE's candidates, a sampled tail's rows and the log-mass all come out capped, as
    transformers' forward gives them."""
    model = make("gemma2", seed=2)
    cap = model.config.final_logit_softcapping
    want = model(PROMPT[None]).logits[0, -1].float()  # transformers: the head, then the cap
    engine = Engine(model, HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8")), dtype=torch.float32,
                    max_seq_len=64)
    assert engine.logit_map.cap == cap and engine.attention_softcap == model.config.attn_logit_softcapping
    hidden = engine.prefill(PROMPT)
    dense, none = engine.logits(hidden, hire=False)
    assert none is None
    torch.testing.assert_close(dense[0], want, rtol=1e-4, atol=1e-4)
    raw = hidden.float() @ engine.head_weight.float().t()
    assert raw.abs().max() > cap  # the cap changes these logits
    torch.testing.assert_close(dense, torch.tanh(raw / cap) * cap, rtol=1e-5, atol=1e-5)
    logits, idx = engine.logits(hidden, hire=True)
    torch.testing.assert_close(logits, dense.gather(-1, idx))
    assert int(idx[0, logits[0].argmax()]) == int(dense.argmax())
    tail = engine.tail(hidden, logits, idx)
    rows = torch.arange(0, VOCAB, 7)
    torch.testing.assert_close(tail.rows(rows), dense[0, rows])
    torch.testing.assert_close(tail.dense(), dense)
    assert tail.bound.abs().max() <= cap
    mass = engine.head.log_mass(hidden, logits, idx)
    assert mass.shape == (1, VOCAB) and torch.isfinite(mass).all() and mass.abs().max() <= cap
    assert engine.log_prob(hidden, torch.tensor([7])) < 0


def test_bf16_engine_runs_and_reports_kernels():
    model = make("llama")
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="cascade", rank=16, stage_candidates=128, bits=8,
                                     group_size=1024),
                     ffn=FFNConfig(density=0.5))
    engine = Engine(model, cfg, head_proxy=_fit(model, cfg), dtype=torch.bfloat16, max_seq_len=64)
    stats = engine.generate(PROMPT, 8, hire=True)
    assert stats.new_tokens == 8 and stats.tokens_per_s > 0
    report = engine.kernel_report()
    assert report["head"] == ["int8pack", "rows"]
    assert report["ffn"] == (["int4"] if engine.native_steps is not None else ["int4pack"])  # the fused 4-bit kernel


@torch.inference_mode()
def test_a_dense_head_switches_to_hire_between_steps():
    """Engine.enable_head (hire serve's switch once the proxy is fitted): an engine built with its head
    off (its FFNs HiRE), switched, decodes what an engine built with the HiRE head decodes; the model's
    config says so and unsparsify_ restores the original modules."""
    from dataclasses import replace

    from hire import unsparsify_

    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="lowrank", rank=16), ffn=FFNConfig(density=0.5))
    proxy = _fit(make("llama", seed=4), cfg)
    want = Engine(make("llama", seed=4), cfg, head_proxy=proxy, dtype=torch.float32, max_seq_len=64)
    model = make("llama", seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = Engine(model, replace(cfg, head=replace(cfg.head, enabled=False)), dtype=torch.float32, max_seq_len=64)
    assert got.head is None
    got.enable_head(cfg, proxy)
    assert got.head is not None and model.hire_config.head == cfg.head and model.hire_config.ffn == cfg.ffn
    assert got.generate(PROMPT, 12, hire=True).token_ids == want.generate(PROMPT, 12, hire=True).token_ids
    h = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.head.decode(h), want.head.decode(h), rtol=0, atol=0)
    with pytest.raises(ValueError, match="HiRE head already"):
        got.enable_head(cfg, proxy)
    unsparsify_(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}


def _fit(model, cfg):
    from hire.calibrate import fit_head_proxy

    return fit_head_proxy(model, cfg.head, torch.randn(400, model.config.hidden_size))


def test_streaming_and_stop_ids():
    model = make("llama")
    engine = Engine(model, None, dtype=torch.float32, max_seq_len=64)
    seen = []
    full = engine.generate(PROMPT, 6, hire=False).token_ids
    stats = engine.generate(PROMPT, 6, hire=False, on_token=seen.append)
    assert seen == full == stats.token_ids
    stopped = engine.generate(PROMPT, 6, hire=False, stop_ids=(full[2],))
    assert stopped.token_ids == full[: full.index(full[2]) + 1]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(1, 100)
    idx = torch.arange(100, 200).unsqueeze(0)
    a = [int(sample(logits, idx, 1.0, 5, None, torch.Generator().manual_seed(s))) for s in range(50)]
    b = [int(sample(logits, idx, 1.0, 5, None, torch.Generator().manual_seed(s))) for s in range(50)]
    assert a == b
    top5 = set((logits.topk(5).indices[0] + 100).tolist())
    assert set(a) <= top5 and len(set(a)) > 1
    assert int(sample(logits, idx)) == int(logits.argmax()) + 100
    nucleus = [int(sample(logits, None, 1.0, None, 1e-6, torch.Generator().manual_seed(s))) for s in range(10)]
    assert set(nucleus) == {int(logits.argmax())}


def test_engine_errors():
    with pytest.raises(ValueError, match="the engine supports"):
        Engine(make("gpt2"))
    engine = Engine(make("llama"), None, dtype=torch.float32, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        engine.generate(PROMPT, 10)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.generate(PROMPT, 0)


def test_engine_without_native_kernels_uses_the_eager_path(tmp_path):
    """HIRE_NATIVE=0 (as on a machine without a compiler): same tokens, eager gather path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, sys; sys.path.insert(0, %r)\n"
        "from tiny_models import make\n"
        "from hire.config import FFNConfig, HeadConfig, HiReConfig\n"
        "from hire.engine import Engine\n"
        "cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy='int8', group_size=4096), ffn=FFNConfig(density=0.5))\n"
        "e = Engine(make('llama', seed=1), cfg, dtype=torch.float32, max_seq_len=64)\n"
        "print(e.kernel_report()['rows'])\n"
        "print(e.generate(torch.tensor(%r), 10, hire=True).token_ids)\n"
    ) % (str(Path(__file__).parent), PROMPT.tolist())
    env = dict(os.environ, HIRE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows, tokens = out.stdout.strip().splitlines()
    assert rows == "eager gather (disabled by HIRE_NATIVE=0)"
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8", group_size=4096), ffn=FFNConfig(density=0.5))
    engine = Engine(make("llama", seed=1), cfg, dtype=torch.float32, max_seq_len=64)
    assert str(engine.generate(PROMPT, 10, hire=True).token_ids) == tokens
