import pytest
import torch

import hire
from hire.arch import ARCHITECTURES, UnsupportedArchitecture, decoder_layers
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.errors import HireError
from hire.layers import HiReFFN, HiReLMHead
from hire.patch import hire_layers, set_mode
from hire.topk import count_for_density
from tiny_models import ARCHS, FFN, VOCAB, WIDTH, make

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def full_config(proxy="int4"):
    """k = n everywhere: every row is a candidate, every neuron kept."""
    return HiReConfig(head=HeadConfig(k=10, candidates=VOCAB, proxy=proxy, rank=8, stage_candidates=VOCAB),
                      ffn=FFNConfig(density=1.0, proxy="int4"))


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_k_equal_n_is_dense(arch):
    model = make(arch)
    dense_logits = model(PROMPT).logits
    dense_tokens = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    hire.sparsify_(model, full_config())
    head, ffns = hire_layers(model)
    assert isinstance(head, HiReLMHead) and len(ffns) == 2
    assert torch.equal(model(PROMPT).logits, dense_logits)  # prefill stays dense
    set_mode(model, head="always", ffn="always")  # every position through HiRE
    torch.testing.assert_close(model(PROMPT).logits, dense_logits, rtol=1e-5, atol=1e-5)
    set_mode(model, head="decode", ffn="decode")
    assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), dense_tokens)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_unsparsify_restores_identical_state_dict(arch):
    model = make(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    hire.sparsify_(model, HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8"), ffn=FFNConfig(density=0.5)))
    model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    hire.unsparsify_(model)
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert not hasattr(model, "hire_config")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_sparse_decode_matches_masked_batch_path(arch):
    """The one-token gather path and the batched mask path pick and compute the same neurons."""
    model = make(arch)
    cfg = HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.3, oversample=1.5, group_size=4))
    hire.sparsify_(model, cfg)
    _, ffns = hire_layers(model)
    x = torch.randn(6, WIDTH)
    for f in ffns:
        batched = f.forward_masked(x)
        single = torch.cat([f.forward_sparse(x[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(single, batched, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_realistic_settings_generate_and_keep_recall():
    model = make("llama")
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=48, proxy="int8"), ffn=FFNConfig(density=0.5, proxy="int8"))
    hire.sparsify_(model, cfg)
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9)
    assert out.shape == (1, PROMPT.shape[1] + 6)
    head, ffns = hire_layers(model)
    h = torch.randn(32, WIDTH)
    values, idx = head.topk(h)
    true = torch.nn.functional.linear(h, head.weight).topk(5, dim=-1)
    assert (idx[:, 0] == true.indices[:, 0]).float().mean() >= 0.95  # int8 proxy, k' ~ 10 k
    f = ffns[0]
    f.track_recall = True
    f.forward_masked(torch.randn(64, WIDTH))
    assert f.recall() > 0.85


@torch.no_grad()
def test_lowrank_and_cascade_heads_fit_from_states():
    model = make("llama")
    states = torch.randn(500, WIDTH)
    for proxy in ("lowrank", "cascade"):
        cfg = HiReConfig(head=HeadConfig(k=10, candidates=VOCAB, proxy=proxy, rank=16, stage_candidates=VOCAB),
                         ffn=FFNConfig(enabled=False))
        dense = model(PROMPT).logits[:, -1]
        hire.sparsify_(model, cfg, head_states=states)
        torch.testing.assert_close(model(PROMPT, logits_to_keep=1).logits[:, -1], dense, rtol=1e-5, atol=1e-5)
        hire.unsparsify_(model)


def test_unsupported_architecture():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    how_to_add = "add an entry to hire.arch.ARCHITECTURES"
    with pytest.raises(ValueError, match=f"unsupported architecture 'bert'.*llama.*{how_to_add}") as err:
        hire.sparsify_(model)
    assert isinstance(err.value, UnsupportedArchitecture) and isinstance(err.value, HireError)


def test_every_architecture_in_the_table_has_a_tiny_model():
    """The table-driven tests above cover the whole table."""
    assert set(ARCHITECTURES) == set(ARCHS)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (HiReConfig(head=HeadConfig(k=10, candidates=VOCAB + 1, proxy="int4")), "exceeds the number of rows"),
        (HiReConfig(head=HeadConfig(k=VOCAB + 1, candidates=VOCAB + 1, proxy="int4")), "head k"),
        (HiReConfig(head=HeadConfig(proxy="lowrank", rank=WIDTH + 1, candidates=64)), "rank 65 is above the hidden width 64"),
        (HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(group_size=48)), f"does not divide the FFN width {FFN}"),
        (HiReConfig(head=HeadConfig(proxy="int4", candidates=64), ffn=FFNConfig(group_size=48)), "does not divide"),
        (HiReConfig(head=HeadConfig(proxy="cascade", candidates=64, stage_candidates=512)), "stage_candidates"),
    ],
)
def test_config_that_does_not_fit_the_model(cfg, match):
    model = make("llama")
    with pytest.raises(ValueError, match=match):
        hire.sparsify_(model, cfg, head_states=torch.randn(200, WIDTH))
    assert not hasattr(model, "hire_config")
    assert not any(isinstance(m, (HiReFFN, HiReLMHead)) for m in model.modules())


@pytest.mark.parametrize("candidates", [VOCAB, 64])
def test_softcapped_model_keeps_its_cap_with_the_hire_head(candidates):
    """Gemma 2's forward caps what the head returns: the candidates' logits are the dense model's, and
    a skipped row's -inf comes out as -cap, below every candidate; the head knows the cap for its own
    decode paths (the engine's)."""
    model = make("gemma2")
    cap = model.config.final_logit_softcapping
    token = torch.tensor([[42]])  # one position: the HiRE path of the patched head
    with torch.no_grad():
        want = model(token).logits[0, -1]
    hire.sparsify_(model, HiReConfig(head=HeadConfig(k=5, candidates=candidates, proxy="int8"), ffn=FFNConfig(enabled=False)))
    assert model.lm_head.logit_map.cap == cap
    with torch.no_grad():
        got = model(token).logits[0, -1]
    kept = got > -cap
    assert int(kept.sum()) == candidates
    torch.testing.assert_close(got[kept], want[kept])
    assert int(got.argmax()) == int(want.argmax())
    if candidates < VOCAB:
        assert torch.equal(got[~kept], torch.full_like(got[~kept], -cap))


def test_lowrank_head_without_states_says_how_to_fit():
    with pytest.raises(ValueError, match="head_states"):
        hire.sparsify_(make("llama"), HiReConfig(head=HeadConfig(proxy="lowrank", candidates=64)))


def test_double_sparsify_and_unsparsify_of_plain_model():
    model = make("llama")
    with pytest.raises(ValueError, match="not sparsified"):
        hire.unsparsify_(model)
    hire.sparsify_(model, HiReConfig(head=HeadConfig(proxy="int8", candidates=64)))
    with pytest.raises(ValueError, match="already sparsified"):
        hire.sparsify_(model, HiReConfig(head=HeadConfig(proxy="int8", candidates=64)))


@torch.no_grad()
def test_a_head_patched_later_computes_what_sparsify_patches_and_unsparsify_restores_all():
    """sparsify_head_ (a server's switch to HiRE once the head is fitted): on a model sparsified with its
    head off, the head computes what sparsify_'s would; unsparsify_ then restores every module."""
    from dataclasses import replace

    from hire.patch import sparsify_head_

    head = HeadConfig(k=5, candidates=64, proxy="int8")
    cfg = HiReConfig(head=head, ffn=FFNConfig(density=0.5))
    want = hire.sparsify_(make("llama", seed=2), cfg)
    model = make("llama", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    hire.sparsify_(model, replace(cfg, head=replace(head, enabled=False)))
    layer = sparsify_head_(model, head)
    assert hire_layers(model)[0] is layer and model.hire_config == cfg
    h = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(1))
    for one in (layer, hire_layers(want)[0]):
        one.prepare_decode(torch.float32)
    torch.testing.assert_close(layer.decode(h), hire_layers(want)[0].decode(h), rtol=0, atol=0)
    with pytest.raises(ValueError, match="HiRE head already"):
        sparsify_head_(model, head)
    hire.unsparsify_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == modules_before
    plain = make("llama")
    sparsify_head_(plain, head)  # not sparsified before: its FFNs stay dense
    assert plain.hire_config.head == head and not plain.hire_config.ffn.enabled and not hire_layers(plain)[1]
    with pytest.raises(ValueError, match="disabled"):
        sparsify_head_(make("llama"), replace(head, enabled=False))


def test_set_mode_rejects_unknown_modes():
    model = make("llama")
    hire.sparsify_(model, HiReConfig(head=HeadConfig(proxy="int8", candidates=64)))
    with pytest.raises(ValueError, match="mode must be one of"):
        set_mode(model, ffn="sparse")


def test_per_layer_ffn_densities():
    model = make("llama")
    n = len(decoder_layers(model))
    densities = [0.25 + 0.5 * i / max(n - 1, 1) for i in range(n)]
    hire.sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(layer_density=densities)))
    ffns = hire_layers(model)[1]
    assert [f.config.density for f in ffns] == densities
    assert [f.keep_groups for f in ffns] == [count_for_density(f.weights.neurons, d) for f, d in zip(ffns, densities)]
    hire.unsparsify_(model)
    with pytest.raises(ValueError, match=f"the config has 3 per-layer FFN densities but the model has {n}"):
        hire.sparsify_(model, HiReConfig(ffn=FFNConfig(layer_density=[0.5] * 3), head=HeadConfig(enabled=False)))
    with pytest.raises(ValueError, match=r"layer_density values must be in \(0, 1\]"):
        FFNConfig(layer_density=[0.5, 1.5])
