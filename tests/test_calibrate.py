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
