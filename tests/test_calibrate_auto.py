"""The head chosen on calibration text (hire.calibrate.auto) for models without recommended settings."""

import json

import pytest
import torch

from hire.calibrate import collect_head_states, head_recall, head_weight
from hire.calibrate import prepare as prepare_mod
from hire.calibrate.auto import choose_head
from hire.cli import main
from hire.config import HeadConfig, HiReConfig
from hire.patch import build_head_selector
from hire.proxies import LowRankProxy
from tiny_models import VOCAB, make


@pytest.fixture(scope="module")
def states():
    model = make("llama")
    windows = torch.randint(0, VOCAB, (8, 32))
    return model, collect_head_states(model, windows[:6], progress=False), collect_head_states(model, windows[6:], progress=False)


def test_the_cheapest_setting_meeting_the_targets_is_chosen(states):
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    ranks, ladder = (4, 8, 16), (16, 32, 64, 96)
    head, report = choose_head(model, cfg, fit, check, 0.9, 0.8, ranks=ranks, candidates=ladder)
    assert not head.auto and head.enabled and head.proxy == "lowrank" and head.select_blocks == 0
    weight = head_weight(model)
    for entry in report["tried"]:  # each rank's smallest k' meeting the targets, measured as hire eval would
        if entry["candidates"] is None:
            continue
        proxy = LowRankProxy.from_weight(weight, entry["rank"], states=fit, u_bits=8)
        chosen = HeadConfig(k=8, proxy="lowrank", rank=entry["rank"], candidates=entry["candidates"])
        r1, rk = head_recall(weight, build_head_selector(weight, chosen, lowrank=proxy), check, 8)
        assert (r1, rk) == pytest.approx((entry["recall_at_1"], entry["recall_at_k"]), abs=1e-6)
        assert r1 >= 0.9 and rk >= 0.8
        smaller = [c for c in ladder if c < entry["candidates"]]
        if smaller:  # and one step less misses a target
            below = HeadConfig(k=8, proxy="lowrank", rank=entry["rank"], candidates=smaller[-1])
            r1, rk = head_recall(weight, build_head_selector(weight, below, lowrank=proxy), check, 8)
            assert r1 < 0.9 or rk < 0.8
    met = [e for e in report["tried"] if e["candidates"] is not None]
    assert report["chosen"] == min(met, key=lambda e: e["bytes_fraction"])
    assert (head.rank, head.candidates) == (report["chosen"]["rank"], report["chosen"]["candidates"])


def test_no_setting_meeting_the_targets_leaves_the_head_dense(states):
    model, fit, check = states
    head, report = choose_head(model, HeadConfig(k=8, auto=True), fit, check, 1.01, 1.01, ranks=(8,), candidates=(16,))
    assert not head.enabled and report["chosen"] is None and "stays dense" in report["reason"]


def test_an_unresolved_auto_head_is_refused_with_the_way_out(states):
    model, _, _ = states
    with pytest.raises(ValueError, match="resolve_auto_head"):
        build_head_selector(head_weight(model), HeadConfig(auto=True))


def test_the_choice_is_cached_by_weight_and_windows(states, tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, _, _ = states
    windows = torch.randint(0, VOCAB, (8, 32))
    config = HiReConfig(head=HeadConfig(k=8, auto=True, proxy="lowrank"))
    first, report = prepare_mod.resolve_auto_head(model, config, windows, progress=False)

    def refit(*args, **kwargs):
        raise AssertionError("the cached choice was not used")

    monkeypatch.setattr(prepare_mod, "collect_head_states", refit)
    again, cached = prepare_mod.resolve_auto_head(model, config, windows, progress=False)
    assert again == first and cached == json.loads(json.dumps(report))
    with pytest.raises(ValueError, match="at least 4 calibration windows"):
        prepare_mod.resolve_auto_head(model, config, windows[:3], progress=False)


def test_a_model_without_recommended_settings_gets_its_head_chosen(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--calib-windows", "8",
                 "--head-k", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    head = result["config"]["head"]
    assert not head["auto"] and result["auto"]["targets"] == {"recall_at_1": 0.995, "recall_at_k": 0.99}
    chosen = result["auto"]["chosen"]
    # the tiny model's only setting (rank 16 = width / 4, k' 96 = vocabulary / 4) meets the targets
    assert head["enabled"] and (head["rank"], head["candidates"]) == (chosen["rank"], chosen["candidates"]) == (16, 96)
    # hire calibrate writes the choice into the config it saves
    assert main(["calibrate", "--model", model_dir, "--steps", "2", "--seq-len", "32", "--calib-windows", "8",
                 "--eval-windows", "1", "--head-k", "8", "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["chosen"] == chosen
    saved = json.loads((tmp_path / "out" / "hire_config.json").read_text())["head"]
    assert not saved["auto"] and (saved["rank"], saved["candidates"]) == (16, 96)
