"""Layer-wise sparse fine-tuning (hire sparsify-train) on tiny models."""

import dataclasses

import pytest
import torch

from hire.errors import ConfigError

from hire.layers.topk_ffn import topk_mlps
from hire.eval import perplexity
from hire.train.sparse_ft import SparseFTConfig, sparse_finetune
from tiny_models import make


def _windows(vocab=384, w=6, t=32):
    return torch.randint(0, vocab, (w, t), generator=torch.Generator().manual_seed(1))


def test_training_fits_every_layer():
    model = make("llama")
    log = sparse_finetune(model, _windows(w=32), SparseFTConfig(density=0.25, steps=60, batch=128, lr=1e-3),
                          progress=False)
    assert len(log["layer"]) == 2 and all(m.density == 0.25 for m in topk_mlps(model))
    assert model.config.hire_topk == {"density": 0.25, "group_size": 1}
    for first, last in zip(log["loss_first"], log["loss_last"]):
        assert last < 0.85 * first  # (random tiny models do not generalise; the real-model test below does)


@pytest.mark.slow
def test_real_model_layers_improve_on_held_out_tokens():
    from hire import load_model
    from hire.data import load_corpus, token_windows
    from hire.patch import decoder_layers

    model, tokenizer = load_model("smollm2-135m")
    del decoder_layers(model)[2:]  # the first two layers are enough to see it
    windows = token_windows(tokenizer, load_corpus().text("calibration"), 128, 24)
    log = sparse_finetune(model, windows, SparseFTConfig(density=0.2, steps=60, batch=256), progress=False)
    for before, after in zip(log["rel_error_before"], log["rel_error_after"]):
        assert after < 0.95 * before


def test_layers_learn_on_the_inputs_the_sparse_model_gives_them():
    """The sequential loop feeds layer l what the finished sparse model feeds it."""
    model = make("gemma3_text")
    windows = _windows()
    log = sparse_finetune(model, windows, SparseFTConfig(density=0.5, steps=3, batch=32), progress=False)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.append(float(a[0].pow(2).mean().sqrt())))
             for m in topk_mlps(model)]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    assert seen == pytest.approx(log["input_rms"], rel=1e-5)


def test_density_one_without_steps_keeps_the_model():
    model = make("llama")
    windows = _windows()
    ref = perplexity(model, windows)
    log = sparse_finetune(model, windows, SparseFTConfig(density=1.0, steps=0), progress=False)
    assert log["rel_error_before"] == [0.0, 0.0]
    assert perplexity(model, windows) == pytest.approx(ref, rel=1e-6)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="density must be in"):
        SparseFTConfig(density=0.0)
    with pytest.raises(ValueError, match="divide the FFN width 128"):
        sparse_finetune(make("llama"), _windows(), SparseFTConfig(density=0.5, group_size=5), progress=False)
    with pytest.raises(ValueError, match="gated MLPs"):
        sparse_finetune(make("gpt2"), _windows(), SparseFTConfig(), progress=False)
    model = make("llama")
    sparse_finetune(model, _windows(), SparseFTConfig(density=0.5, steps=1, batch=8), progress=False)
    with pytest.raises(ValueError, match="already has top-k FFNs"):
        sparse_finetune(model, _windows(), SparseFTConfig(density=0.5, steps=1), progress=False)


def test_config_is_frozen_typed_and_round_trips():
    cfg = SparseFTConfig(density=0.5, layer_density=[0.25, 0.75])
    assert cfg.layer_density == (0.25, 0.75)
    assert cfg.to_dict()["layer_density"] == [0.25, 0.75]
    assert SparseFTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer_density = (0.5, 0.5)
    assert dataclasses.replace(cfg, layer_density=[0.5, 0.5]).layer_density == (0.5, 0.5)
    with pytest.raises(ConfigError, match=r"layer densities must be in \(0, 1\], got \[0.0\]"):
        dataclasses.replace(cfg, layer_density=[0.5, 0.0])
    for data, message in [
        ({"steps": 2.5}, "config field steps must be an integer, got 2.5 (float)"),
        ({"layer_density": [0.5, "0.2"]}, "config field layer_density must be a list of numbers; item 1 is '0.2' (str)"),
        ("x", "a sparse fine-tuning config must be a JSON object, got str"),
        ({"lr_decay": 1}, "unknown config key lr_decay: a sparse fine-tuning config takes density, group_size, steps, "
                          "batch, lr, seed, layer_density; remove or rename it"),
    ]:
        with pytest.raises(ConfigError) as err:
            SparseFTConfig.from_dict(data)
        assert str(err.value).startswith(message)


def test_per_layer_densities_from_a_tuple_and_a_clear_error_for_the_wrong_count():
    model = make("llama")
    log = sparse_finetune(model, _windows(), SparseFTConfig(layer_density=(0.25, 0.5), steps=1, batch=8), progress=False)
    assert [m.density for m in topk_mlps(model)] == [0.25, 0.5]
    assert log["config"]["layer_density"] == [0.25, 0.5]  # JSON-shaped in the log
    with pytest.raises(ValueError, match="3 layer densities for a model with 2 decoder layers"):
        sparse_finetune(make("llama"), _windows(), SparseFTConfig(layer_density=(0.5,) * 3, steps=1), progress=False)
