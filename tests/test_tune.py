"""hire tune: per-layer FFN densities from output-KL sensitivities and a knapsack, vs uniform."""

import dataclasses

import pytest
import torch

from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.eval import perplexity
from hire.patch import hire_layers, set_mode, sparsify_, unsparsify_
from hire.tune import allocate, sensitivity, tune_ffn
from tiny_models import VOCAB, make

CFG = HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.6, proxy="int8"))


def _windows(seed=0):
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_sensitivity_is_zero_at_full_density_and_bytes_grow_with_density():
    model = make("llama", seed=2)
    windows = _windows()
    with torch.no_grad():
        ref = [torch.log_softmax(model(w[None]).logits[0], -1) for w in windows]
    sparsify_(model, CFG)
    kl, nbytes = sensitivity(model, windows, (0.25, 0.5, 1.0), ref, progress=False)
    dense = [f.dense_nbytes() for f in hire_layers(model)[1]]
    unsparsify_(model)
    assert len(kl) == model.config.num_hidden_layers
    for row_kl, row_b, d in zip(kl, nbytes, dense):
        assert row_kl[-1] == 0.0 and row_kl[0] > 0
        assert row_b[0] < row_b[1] and row_b[-1] == d  # density 1 reads the dense FFN, no proxy


def test_allocate_trades_bytes_for_kl():
    kl = [[0.5, 0.1, 0.0], [0.01, 0.001, 0.0]]
    nbytes = [[30, 60, 100], [30, 60, 100]]
    dens = (0.2, 0.5, 1.0)
    assert allocate(kl, nbytes, dens, 0.0) == [0.2, 0.2]  # free quality: cheapest everywhere
    assert allocate(kl, nbytes, dens, 1e6) == [1.0, 1.0]  # priceless quality: dense everywhere
    assert allocate(kl, nbytes, dens, 2.0) == [0.5, 0.2]  # the sensitive layer gets the bytes


def test_tune_meets_the_budget_and_beats_or_matches_uniform():
    model = make("llama", seed=2)
    windows = _windows()
    result = tune_ffn(model, CFG, windows, 0.02, densities=(0.25, 0.5, 0.75), steps=6, progress=False)
    if result.uniform is not None and result.tuned is not None:
        assert result.ffn_bytes == min(result.uniform["ffn_bytes"], result.tuned["ffn_bytes"])
    assert result.ppl_hire / result.ppl_dense - 1 <= 0.02
    dens = result.config.ffn.layer_density or [result.config.ffn.density] * model.config.num_hidden_layers
    assert all(d in (0.25, 0.5, 0.75, 1.0) for d in dens)
    assert isinstance(result.config.ffn.layer_density, tuple)
    # only the FFN densities change: the input's head (and the input itself, which is frozen) stay as given
    assert result.config.head == CFG.head and CFG.ffn.layer_density == ()
    assert dataclasses.replace(result.config.ffn, density=CFG.ffn.density, layer_density=()) == CFG.ffn
    # the written config reproduces the reported perplexity
    sparsify_(model, result.config)
    set_mode(model, ffn="always")
    assert perplexity(model, windows) == pytest.approx(result.ppl_hire, rel=1e-5)
    set_mode(model, ffn="decode")
    unsparsify_(model)


def test_tune_refuses_bad_budgets():
    model = make("llama")
    with pytest.raises(ValueError, match="max_ppl_increase must be > 0"):
        tune_ffn(model, CFG, _windows(), 0.0, progress=False)
    with pytest.raises(ValueError, match="the FFN is disabled"):
        tune_ffn(model, HiReConfig(ffn=FFNConfig(enabled=False)), _windows(), 0.03, progress=False)
    with pytest.raises(ValueError, match=r"densities must be in \(0, 1\]"):
        tune_ffn(model, CFG, _windows(), 0.03, densities=(0.0, 0.5), progress=False)
    with pytest.raises(ValueError, match="sensitivity_windows must be in"):
        tune_ffn(model, CFG, _windows(), 0.03, sensitivity_windows=3, progress=False)


def test_allocate_mean_density_spends_density_where_the_kl_is():
    from hire.tune import allocate_mean_density

    dens = (0.1, 0.2, 0.4)
    kl = [[1.0, 0.5, 0.1], [0.01, 0.005, 0.0], [0.02, 0.01, 0.0]]
    pick = allocate_mean_density(kl, dens, 0.2)
    assert sum(pick) / 3 <= 0.2 + 1e-9 and pick[0] == 0.4 and pick[1:] == [0.1, 0.1]
    assert allocate_mean_density(kl, dens, 0.4) == [0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="outside the candidates"):
        allocate_mean_density(kl, dens, 0.05)
