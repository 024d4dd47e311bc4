from pathlib import Path

import pytest
import torch

from hire.calibrate import cached_head_proxy, collect_head_states, load_head_proxy, save_head_proxy
from hire.config import HeadConfig
from hire.proxies import LowRankProxy
from tiny_models import VOCAB, WIDTH, make


def test_collect_states_are_the_head_inputs():
    model = make("llama")
    windows = torch.randint(0, VOCAB, (3, 10))
    states = collect_head_states(model, windows, progress=False)
    assert states.shape == (30, WIDTH)
    logits = model(windows[:1]).logits[0]
    torch.testing.assert_close(states[:10] @ model.lm_head.weight.t(), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_collect_states_in_batches_equal_one_window_at_a_time(arch):
    """Several windows per forward pass (STATE_BATCH) give each window's own states, in order: the
    last batch shorter, every window from its own start (no state crosses between windows)."""
    model = make(arch)
    windows = torch.randint(0, VOCAB, (5, 12))
    one = collect_head_states(model, windows, progress=False, batch=1)
    for batch in (2, 4, 5):
        torch.testing.assert_close(collect_head_states(model, windows, progress=False, batch=batch), one,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[12:24], collect_head_states(model, windows[1:2], progress=False), rtol=1e-5, atol=1e-5)


def test_saved_proxy_round_trip_and_mismatch(tmp_path):
    w = torch.randn(VOCAB, WIDTH)
    proxy = LowRankProxy.from_weight(w, 8, states=torch.randn(200, WIDTH), u_bits=8)
    path = tmp_path / "p.safetensors"
    save_head_proxy(path, proxy, {"rank": 8})
    back = load_head_proxy(path, expect={"rank": 8})
    x = torch.randn(2, WIDTH)
    assert torch.equal(back.scores(x), proxy.scores(x))
    with pytest.raises(ValueError, match="fitted for rank=8, not 16"):
        load_head_proxy(path, expect={"rank": 16})


def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    w = torch.randn(VOCAB, WIDTH)
    proxy = LowRankProxy.from_weight(w, 8, states=torch.randn(200, WIDTH), u_bits=8)
    path = tmp_path / "p.safetensors"
    save_head_proxy(path, proxy, {"rank": 8})
    before = path.read_bytes()

    def killed(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_head_proxy(path, proxy, {"rank": 16})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_corrupt_proxy_file_is_an_error_and_the_cache_refits(tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model = make("llama")
    cfg = HeadConfig(proxy="cascade", rank=8, candidates=64, stage_candidates=128)
    windows = torch.randint(0, VOCAB, (2, 64))
    first = cached_head_proxy(model, cfg, windows, progress=False)
    [path] = list((tmp_path / "proxies").iterdir())
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupt"):
        load_head_proxy(path)
    again = cached_head_proxy(model, cfg, windows, progress=False)  # refits instead of using it
    x = torch.randn(3, WIDTH)
    assert torch.equal(again.scores(x), first.scores(x))
    assert load_head_proxy(path).rank == 8


def _head_data(seed=0, n=2048):
    """A head whose inputs live in a low-dimensional subspace, as real hidden states do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(VOCAB, WIDTH, generator=g)
    basis = torch.randn(12, WIDTH, generator=g)
    states = torch.randn(n, 12, generator=g) @ basis + 0.1 * torch.randn(n, WIDTH, generator=g)
    return w, states


def test_training_reduces_the_loss_and_keeps_storage():
    from hire.calibrate.train import train_lowrank_proxy

    w, states = _head_data()
    fitted = LowRankProxy.from_weight(w, 4, states=states[:1024], u_bits=8)
    trained, log = train_lowrank_proxy(w, fitted, states[:1024], 150, batch=64, progress=False)
    assert len(log.loss) == 150
    assert sum(log.loss[-20:]) / 20 < 0.9 * sum(log.loss[:20]) / 20
    assert trained.shape == fitted.shape and trained.rank == 4
    assert type(trained.u) is type(fitted.u) and trained.u.bits == 8


def test_training_is_seeded():
    from hire.calibrate.train import train_lowrank_proxy

    w, states = _head_data()
    fitted = LowRankProxy.from_weight(w, 4, states=states, u_bits=16)
    a, _ = train_lowrank_proxy(w, fitted, states, 5, batch=32, seed=3, progress=False)
    b, _ = train_lowrank_proxy(w, fitted, states, 5, batch=32, seed=3, progress=False)
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(steps=0), "steps must be >= 1"), (dict(steps=2, temperature=0.0), "temperature must be > 0"),
     (dict(steps=2, states=torch.randn(10, WIDTH + 1)), "head states must be")],
)
def test_training_refuses_bad_arguments(kwargs, match):
    from hire.calibrate.train import train_lowrank_proxy

    w, states = _head_data()
    fitted = LowRankProxy.from_weight(w, 4, states=states)
    kwargs.setdefault("states", states)
    with pytest.raises(ValueError, match=match):
        train_lowrank_proxy(w, fitted, kwargs.pop("states"), kwargs.pop("steps"), **kwargs)


def test_config_with_proxy_file_loads_it_and_checks_the_model(tmp_path):
    from hire.calibrate import proxy_meta
    from hire.config import HiReConfig

    model = make("llama")
    cfg = HeadConfig(proxy="lowrank", rank=8, candidates=64)
    proxy = LowRankProxy.from_weight(model.lm_head.weight.detach(), 8, states=torch.randn(200, WIDTH), u_bits=8)
    save_head_proxy(tmp_path / "head_proxy.safetensors", proxy, proxy_meta(model, cfg))
    HiReConfig(head=HeadConfig(proxy="lowrank", rank=8, candidates=64, proxy_file="head_proxy.safetensors")).save(tmp_path / "c.json")
    loaded = HiReConfig.load(tmp_path / "c.json")  # the relative path resolves next to the config
    assert loaded.head.proxy_file == str(tmp_path / "head_proxy.safetensors")
    got = cached_head_proxy(model, loaded.head, torch.randint(0, VOCAB, (1, 8)), progress=False)
    x = torch.randn(3, WIDTH)
    assert torch.equal(got.scores(x), proxy.scores(x))
    other = make("llama", seed=9)  # different weights: the proxy does not belong to it
    with pytest.raises(ValueError, match="fitted for weight="):
        cached_head_proxy(other, loaded.head, torch.randint(0, VOCAB, (1, 8)), progress=False)
    with pytest.raises(ValueError, match="proxy_file holds a low-rank proxy"):
        HeadConfig(proxy="int8", proxy_file="x.safetensors")


def test_the_head_is_read_a_slice_at_a_time_as_the_whole(tmp_path):
    """HeadRows gives a GGUF head's rows dequantized slice by slice (and a float head's as they are),
    and exact_topk over its slices is torch.topk over the whole logits."""
    from test_quant import write_gguf

    from hire.calibrate.states import HeadRows, exact_topk
    from hire.quant import load_quantized

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    codes = load_quantized(path)[0]
    for model in (codes, make("llama")):
        rows = HeadRows(model)
        whole = model.get_output_embeddings().weight.float()
        assert rows.shape == tuple(whole.shape)
        torch.testing.assert_close(torch.cat([rows[s : s + 37] for s in range(0, VOCAB, 37)]), whole, rtol=0, atol=0)
        states = torch.randn(9, WIDTH)
        want = (states @ whole.t()).topk(12, dim=-1).indices
        assert torch.equal(exact_topk(rows, states, 12, block=50), want)
        with pytest.raises(TypeError, match="contiguous slice"):
            rows[torch.tensor([1, 2])]


def test_collecting_states_stops_at_the_head():
    """The head's input is all collect_head_states needs: the head itself never runs."""
    model = make("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    states = collect_head_states(model, torch.randint(0, VOCAB, (2, 8)), progress=False)
    assert states.shape == (16, WIDTH) and calls == []
    model(torch.randint(0, VOCAB, (1, 8)))  # the hook removed: the model runs whole again
    assert calls == [1]
