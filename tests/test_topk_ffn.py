"""TopKMLP (the FFN of a model trained for sparsity) against its definition and against HiReFFN."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hire import FFNConfig, HiReConfig, HeadConfig, load_model, sparsify_
from hire.layers import TopKMLP, apply_topk_
from hire.layers.topk_ffn import apply_saved_topk_, topk_mlps
from hire.patch import set_mode
from tiny_models import FFN, make


def _reference(mlp, x, keep, group):
    # the definition: top `keep` groups of |act(gate) * up|, group score = sum of |a|
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    g = a.abs().view(*a.shape[:-1], -1, group).sum(-1)
    top = torch.topk(g, keep, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
    return mlp.down_proj(a * mask.repeat_interleave(group, dim=-1))


def test_density_one_is_the_dense_mlp():
    model = make("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, mlp.gate_proj.in_features)
    assert torch.equal(TopKMLP(mlp, 1.0)(x), mlp(x))


@given(density=st.floats(0.01, 1.0), group=st.sampled_from([1, 2, 8, 32]), seed=st.integers(0, 100))
def test_topk_mlp_matches_its_definition(density, group, seed):
    torch.manual_seed(seed)
    model = make("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 7, mlp.gate_proj.in_features)
    layer = TopKMLP(mlp, density, group)
    expect = _reference(mlp, x, layer.keep_groups, group)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-6)
    assert layer.keep_groups == max(1, min(FFN // group, round(density * (FFN // group))))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("group", [1, 8])
def test_hire_with_an_exact_proxy_computes_the_trained_topk(arch, group):
    """HiReFFN's selection rule is the trained one: with an exact proxy it equals TopKMLP."""
    model = apply_topk_(make(arch), 0.25, group)
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False),
                                ffn=FFNConfig(density=0.25, proxy="exact", group_size=group)))
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        set_mode(model, ffn="dense")  # the base layer: TopKMLP
        ref = model(ids).logits
        set_mode(model, ffn="always")
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_gradients_reach_only_kept_neurons():
    model = make("llama")
    layer = TopKMLP(model.model.layers[0].mlp, 0.1)
    x = torch.randn(1, layer.gate_proj.in_features)
    layer(x).sum().backward()
    a = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)
    kept = layer.mask(a)[0]
    touched = layer.down_proj.weight.grad.abs().sum(0) > 0  # (I,) columns of down_proj
    assert torch.equal(touched, kept)


@pytest.mark.parametrize("density,group,match", [
    (0.0, 1, "density must be in"), (1.5, 1, "density must be in"), (-0.1, 1, "density must be in"),
    (0.5, 3, "divide the FFN width 128"), (0.5, 0, "divide the FFN width"),
])
def test_bad_settings_fail_clearly(density, group, match):
    model = make("llama")
    before = type(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match=match):
        apply_topk_(model, density, group)
    assert type(model.model.layers[0].mlp) is before  # nothing changed


def test_non_gated_architectures_are_refused():
    with pytest.raises(ValueError, match="gated MLPs"):
        apply_topk_(make("gpt2"), 0.5)


def test_saved_topk_survives_save_and_load(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model = apply_topk_(make("llama"), 0.25, 8)
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    mlps = topk_mlps(loaded)
    assert len(mlps) == 2 and all(m.density == 0.25 and m.group_size == 8 for m in mlps)
    ids = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_corrupt_saved_topk_is_refused():
    model = make("llama")
    model.config.hire_topk = {"density": 0.5}
    with pytest.raises(ValueError, match="hire_topk must be"):
        apply_saved_topk_(model)
    model.config.hire_topk = {"density": 2.0, "group_size": 1}
    with pytest.raises(ValueError, match="density must be in"):
        apply_saved_topk_(model)


def test_per_layer_densities_are_recorded_and_reloaded(tmp_path):
    model = apply_topk_(make("llama"), [0.25, 0.5])
    assert model.config.hire_topk == {"density": 0.375, "group_size": 1, "layer_density": [0.25, 0.5]}
    assert [m.density for m in topk_mlps(model)] == [0.25, 0.5]
    fresh = make("llama")
    fresh.config.hire_topk = model.config.hire_topk
    assert [m.density for m in topk_mlps(apply_saved_topk_(fresh))] == [0.25, 0.5]
    with pytest.raises(ValueError, match="3 per-layer FFN densities for a model with 2"):
        apply_topk_(make("llama"), [0.5, 0.5, 0.5])
