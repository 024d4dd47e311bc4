"""The head chosen on calibration text (hire.calibrate.auto) for models without recommended settings."""

import json
import logging

import pytest
import torch

from hire import native
from hire.calibrate import auto as auto_mod
from hire.calibrate import collect_head_states, head_recall, head_weight
from hire.calibrate import prepare as prepare_mod
from hire.calibrate.auto import choose_head, measure_head_times, pair_name
from hire.cli import main
from hire.config import HeadConfig, HiReConfig
from hire.patch import build_head_selector
from hire.proxies import LowRankProxy
from tiny_models import VOCAB, make


@pytest.fixture(scope="module")
def states():
    native.available()  # loaded once from the usual cache: tests that move HIRE_CACHE do not build them again
    model = make("llama")
    windows = torch.randint(0, VOCAB, (8, 32))
    return model, collect_head_states(model, windows[:6], progress=False), collect_head_states(model, windows[6:], progress=False)


def test_the_cheapest_setting_meeting_the_targets_is_chosen(states):
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    ranks, ladder = (4, 8, 16), (16, 32, 64, 96)
    head, report = choose_head(model, cfg, fit, check, 0.9, 0.8, ranks=ranks, candidates=ladder, measure=False)
    assert report["by"] == "bytes" and "timing" not in report and "not timed" in report["reason"]
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

    def untimed(heads, hidden):
        raise AssertionError("nothing reached the targets: nothing to time")

    head, report = choose_head(model, HeadConfig(k=8, auto=True), fit, check, 1.01, 1.01, ranks=(8,), candidates=(16,),
                               timer=untimed)
    assert not head.enabled and report["chosen"] is None and "stays dense" in report["reason"]
    assert report["by"] == "recall"


RANKS, LADDER, TARGETS = (4, 8, 16), (16, 32, 64, 96), (0.5, 0.4)  # several settings meet these


class FakeTimer:
    """A deterministic timer: every head is called once (each HiRE head's candidate logits checked
    against the dense head's), then given the ms of ``ms(name)``."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, heads, hidden):
        self.calls.append(sorted(heads))
        assert hidden.dtype == torch.float16 and 1 <= hidden.shape[0] <= auto_mod.TIMING_STATES
        h = hidden[:1]
        dense = heads["dense"](h)  # (1, V) float32
        for name, call in heads.items():
            if name != "dense":
                logits, idx = call(h)  # the HiRE head's decode: exact logits of its candidates
                torch.testing.assert_close(logits, dense.gather(-1, idx), rtol=1e-3, atol=1e-3)
        return {name: self.ms(name) for name in heads}


def _met(report):
    return [e for e in report["tried"] if e["candidates"] is not None]


def test_the_fastest_setting_meeting_the_targets_wins(states, tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    _, by_bytes = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, measure=False)
    met = _met(by_bytes)
    assert len(met) >= 2
    # the byte-cheapest setting is the slowest here: time, not bytes, must decide
    order = sorted(met, key=lambda e: e["bytes_fraction"], reverse=True)
    ms = {pair_name(e["rank"], e["candidates"]): 1.0 + i for i, e in enumerate(order)}
    timer = FakeTimer(lambda name: 10.0 if name == "dense" else ms[name])
    head, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, timer=timer)
    assert timer.calls == [sorted(["dense", *ms])]
    fastest = order[0]
    assert report["by"] == "time" and report["chosen"]["rank"] == fastest["rank"] != by_bytes["chosen"]["rank"]
    assert (head.enabled, head.rank, head.candidates) == (True, fastest["rank"], fastest["candidates"])
    # the report carries every timed setting's ms and the dense head's, and why
    assert {pair_name(e["rank"], e["candidates"]): e["ms"] for e in _met(report)} == ms
    timing = report["timing"]
    assert timing["dense_ms"] == 10.0 and timing["source"] == "measured"
    assert set(timing["machine"]) == {"cpu", "threads", "kernels", "head"} and timing["machine"]["head"] == "float16"
    assert "1.000 ms per token against the dense head's 10.000 ms (10.00x)" in report["reason"]
    json.dumps(report)  # written as JSON by resolve_auto_head


def test_the_head_stays_dense_when_no_setting_beats_the_dense_head(states, tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    # within MIN_GAIN of the dense head is not a win
    timer = FakeTimer(lambda name: 1.0 if name == "dense" else 1.0 - auto_mod.MIN_GAIN / 2)
    head, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, timer=timer)
    assert not head.enabled and not head.auto and report["chosen"] is None and report["by"] == "time"
    assert "stays dense" in report["reason"] and "against the dense head's 1.000 ms" in report["reason"]
    assert all(e["ms"] == 1.0 - auto_mod.MIN_GAIN / 2 for e in _met(report)) and report["timing"]["dense_ms"] == 1.0


def test_the_timings_are_cached_per_machine_and_model(states, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    args = (model, cfg, fit, check, *TARGETS)
    first_timer = FakeTimer(lambda name: 3.0 if name == "dense" else 1.0 + len(name) / 10)
    head, first = choose_head(*args, ranks=RANKS, candidates=LADDER, timer=first_timer)
    files = list((tmp_path / "timings").glob("head-*.json"))
    assert len(files) == 1 and first["timing"]["file"] == str(files[0])
    saved = json.loads(files[0].read_text())
    assert saved["dense_ms"] == 3.0 and saved["meta"]["cpu"] == auto_mod.cpu_name()

    def refuse(heads, hidden):
        raise AssertionError("the cached timings were not used")

    again_head, again = choose_head(*args, ranks=RANKS, candidates=LADDER, timer=refuse)
    assert again_head == head and again["timing"]["source"] == "cache"
    assert [e.get("ms") for e in again["tried"]] == [e.get("ms") for e in first["tried"]]
    # a setting the cache lacks (higher targets: a larger k'): all are timed again, in one loop with the dense head
    counting = FakeTimer(lambda name: 3.0 if name == "dense" else 2.0)
    _, more = choose_head(model, cfg, fit, check, 0.6, 0.5, ranks=RANKS, candidates=LADDER, timer=counting)
    assert more["timing"]["source"] == "measured" and counting.calls
    assert {pair_name(e["rank"], e["candidates"]) for e in _met(more)} - {pair_name(e["rank"], e["candidates"])
                                                                          for e in _met(first)}
    # another machine (or thread count, or kernel build) does not share them
    monkeypatch.setattr(auto_mod, "cpu_name", lambda: "another CPU")
    other = FakeTimer(lambda name: 1.0)
    _, elsewhere = choose_head(*args, ranks=RANKS, candidates=LADDER, timer=other)
    assert other.calls and elsewhere["timing"]["file"] != first["timing"]["file"]
    assert elsewhere["chosen"] is None  # no faster than dense there
    # a damaged file: a warning, timed again and rewritten, never a crash
    path = elsewhere["timing"]["file"]
    for damage in ("{not json", json.dumps({"meta": saved["meta"] | {"cpu": "another CPU"}, "dense_ms": "x",
                                            "pairs": {}}), "[]"):
        with open(path, "w") as f:
            f.write(damage)
        caplog.clear()
        retimed = FakeTimer(lambda name: 1.0)
        with caplog.at_level(logging.WARNING, logger="hire"):
            _, report = choose_head(*args, ranks=RANKS, candidates=LADDER, timer=retimed)
        assert retimed.calls and report["timing"]["source"] == "measured"
        assert any("damaged" in r.getMessage() for r in caplog.records), damage
        assert json.loads(open(path).read())["dense_ms"] == 1.0


def test_timing_that_fails_falls_back_to_bytes(states, tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")

    def broken(heads, hidden):
        raise RuntimeError("no clock here")

    head, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, timer=broken)
    _, by_bytes = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, measure=False)
    assert report["by"] == "bytes" and "no clock here" in report["timing_error"]
    assert report["chosen"] == by_bytes["chosen"] and head.rank == by_bytes["chosen"]["rank"]
    assert not list((tmp_path / "timings").glob("*.json"))


def test_the_heads_are_timed_for_real(states, tmp_path, monkeypatch):
    """The default timer on the real heads: every setting gets its ms (which wins is the machine's call)."""
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    monkeypatch.setattr(auto_mod, "TIMING_ROUNDS", 3)
    model, fit, check = states
    head, report = choose_head(model, HeadConfig(k=8, auto=True, proxy="lowrank"), fit, check, *TARGETS, ranks=RANKS,
                               candidates=LADDER)
    met = _met(report)
    assert report["by"] == "time" and report["timing"]["dense_ms"] > 0 and len(met) >= 2
    assert all(e["ms"] > 0 for e in met) and head.enabled == (report["chosen"] is not None)
    if report["chosen"] is not None:
        assert report["chosen"]["ms"] == min(e["ms"] for e in met) < report["timing"]["dense_ms"]


def test_measure_head_times_takes_turns_and_the_quietest_blocks_medians():
    """A fake clock: each call advances it by its head's cost. Of three blocks of three rounds, the
    middle one is quiet (the others 10x slower, as under another process's burst), with one outlier."""
    now, order = [0.0], []
    base = {"a": 0.002, "b": 0.001, "c": 0.003}

    def head(name):
        def call(h):
            assert h.shape == (1, 4)
            order.append(name)
            timed = len([n for n in order if n == name]) - 1 - 4  # this head's timed round (warm-up: < 0)
            outlier = name == "b" and timed == 4
            now[0] += 1.0 if outlier else base[name] * (1 if 3 <= timed < 6 else 10)
        return call

    heads = {name: head(name) for name in base}
    ms = measure_head_times(heads, torch.zeros(3, 4), rounds=9, warmup=4, blocks=3, clock=lambda: now[0])
    assert ms == pytest.approx({"a": 2.0, "b": 1.0, "c": 3.0})
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 13 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every head once per round
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]  # the order rotates
    with pytest.raises(ValueError, match="at least one round"):
        measure_head_times(heads, torch.zeros(3, 4), rounds=0)


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


def test_a_model_without_recommended_settings_gets_its_head_chosen(model_dir, tmp_path, capsys, monkeypatch):
    # a timer under which the HiRE head is twice as fast (a real one decides by this machine's load)
    monkeypatch.setattr(auto_mod, "measure_head_times", FakeTimer(lambda name: 2.0 if name == "dense" else 1.0))
    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--calib-windows", "8",
                 "--head-k", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    head = result["config"]["head"]
    assert not head["auto"] and result["auto"]["targets"] == {"recall_at_1": 0.995, "recall_at_k": 0.99}
    assert result["auto"]["by"] == "time" and result["auto"]["chosen"]["ms"] == 1.0
    chosen = result["auto"]["chosen"]
    # the tiny model's only setting (rank 32 = width / 2 with the auto head's 4-bit U, k' 96 = vocabulary / 4)
    # meets the targets, checked on each calibration domain with the proxy fitted on the others
    assert head["enabled"] and head["rank_bits"] == 4 and result["auto"]["check"] == "left-out domains"
    assert result["auto"]["folds"] == 5
    assert (head["rank"], head["candidates"]) == (chosen["rank"], chosen["candidates"]) == (32, 96)
    # hire calibrate writes the choice into the config it saves
    assert main(["calibrate", "--model", model_dir, "--steps", "2", "--seq-len", "32", "--calib-windows", "8",
                 "--eval-windows", "1", "--head-k", "8", "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["chosen"] == chosen
    saved = json.loads((tmp_path / "out" / "hire_config.json").read_text())["head"]
    assert not saved["auto"] and (saved["rank"], saved["candidates"], saved["rank_bits"]) == (32, 96, 4)


def test_bytes_are_counted_in_the_heads_own_format(states, tmp_path):
    """The byte rule reads the candidates' rows as the engine does: a GGUF head's codes with their
    scales (Q8_0 here: 34 bytes per 32 columns), a 16-bit row otherwise."""
    from test_quant import write_gguf

    from hire.quant import load_quantized
    from hire.quant.tensor import QLinear

    model, fit, check = states
    width = model.config.hidden_size
    assert auto_mod.decode_row_bytes(model) == width * 2
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    codes = load_quantized(path)[0]
    head = auto_mod.head_module(codes)
    assert isinstance(head, QLinear) and head.q.format == "Q8_0"
    row = auto_mod.decode_row_bytes(codes)
    assert row == head.q.nbytes / head.q.shape[0] == pytest.approx(width * 34 / 32)
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    _, report = choose_head(codes, cfg, fit, check, 0.5, 0.5, ranks=(8,), candidates=(32, 64, 96), measure=False)
    entry = report["tried"][0]
    proxy = LowRankProxy.from_weight(head_weight(codes).float(), 8, states=fit, u_bits=8)
    vocab = head.q.shape[0]
    assert entry["bytes_fraction"] == pytest.approx((proxy.nbytes() + entry["candidates"] * row) / (vocab * row))


def test_each_rank_is_also_tried_with_the_local_top_k(states, tmp_path, monkeypatch):
    """Every rank gets a second setting, the first pass's local top-k over blocks (with its own
    smallest k' meeting the targets, measured as the selector selects), timed like the others and
    chosen, select_blocks included, when it is the fastest."""
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    monkeypatch.setattr(auto_mod, "MIN_BLOCK_ROWS", 16)  # the tiny vocabulary: 8 blocks of 48 rows
    model, fit, check = states
    assert auto_mod.select_blocks_for(VOCAB, (8,)) == 8 and auto_mod.select_blocks_for(VOCAB, (7,)) == 0
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    _, by_bytes = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, measure=False,
                              blocks=(8,))
    tried = [e for e in by_bytes["tried"] if not e.get("skipped")]
    assert [e["select_blocks"] for e in tried] == [0, 8] * len({e["rank"] for e in tried})
    assert [e["rank"] for e in by_bytes["tried"] if not e["select_blocks"]] == list(RANKS)
    fewest = min(e["bytes_fraction"] for e in _met(by_bytes))
    for e in by_bytes["tried"]:  # a rank is skipped only where its U alone reads more than a met head
        if e.get("skipped"):
            vocab, width = head_weight(model).shape
            row = auto_mod.decode_row_bytes(model)
            u = LowRankProxy.u_nbytes(vocab, e["rank"], 8) + e["rank"] * width * 2
            assert u / (vocab * row) >= fewest
    weight = head_weight(model)
    local = [e for e in _met(by_bytes) if e["select_blocks"]]
    assert local
    for entry in local:
        proxy = LowRankProxy.from_weight(weight, entry["rank"], states=fit, u_bits=8)
        chosen = HeadConfig(k=8, proxy="lowrank", rank=entry["rank"], candidates=entry["candidates"], select_blocks=8)
        r1, rk = head_recall(weight, build_head_selector(weight, chosen, lowrank=proxy), check, 8)
        assert (r1, rk) == pytest.approx((entry["recall_at_1"], entry["recall_at_k"]), abs=1e-6)
        assert r1 >= TARGETS[0] and rk >= TARGETS[1]
    ms = {pair_name(e["rank"], e["candidates"], e["select_blocks"]): (1.0 if e["select_blocks"] else 2.0) + 0.1 * i
          for i, e in enumerate(_met(by_bytes))}
    timer = FakeTimer(lambda name: 10.0 if name == "dense" else ms[name])
    head, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, timer=timer,
                               blocks=(8,))
    assert timer.calls == [sorted(["dense", *ms])] and any("/8" in name for name in ms)
    assert report["chosen"] == local[0] | {"ms": ms[pair_name(local[0]["rank"], local[0]["candidates"], 8)]}
    assert (head.rank, head.candidates, head.select_blocks) == (local[0]["rank"], local[0]["candidates"], 8)
    assert "local top-k over 8 blocks" in report["reason"]


def test_the_choice_and_the_proxy_share_one_pass_over_the_calibration_text(model_dir, tmp_path, monkeypatch):
    """Choosing the head and fitting its proxy need the same states: a first run collects them once
    (a forward pass per calibration window: minutes on a 0.5B model), a run with both cached not at all."""
    from hire.calibrate import proxy_cache

    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    monkeypatch.setattr(auto_mod, "measure_head_times", FakeTimer(lambda name: 2.0 if name == "dense" else 1.0))
    calls = []

    def counted(model, windows, progress=True, max_states=None, bfloat16=False):
        calls.append(windows.shape[0])
        assert not bfloat16  # a float model's states stay float32
        return collect_head_states(model, windows, progress=False)

    monkeypatch.setattr(prepare_mod, "collect_head_states", counted)
    monkeypatch.setattr(proxy_cache, "collect_head_states", counted)
    config = HiReConfig(head=HeadConfig(k=8, auto=True, proxy="lowrank"))
    first = prepare_mod.prepare_model(model_dir, config, seq_len=32, calib_windows=8, progress=False)
    assert calls == [8] and first.config.head.enabled and first.head_proxy is not None
    again = prepare_mod.prepare_model(model_dir, config, seq_len=32, calib_windows=8, progress=False)
    assert calls == [8] and again.config == first.config
    assert torch.equal(again.head_proxy.dense_u(), first.head_proxy.dense_u())


@pytest.mark.parametrize("slower", [1.04, 1.06])
def test_settings_as_fast_within_the_noise_go_to_the_fewest_bytes(states, tmp_path, monkeypatch, slower):
    """Two runs on a shared machine time near settings in either order; within TIME_TIE (5 %) of the
    fastest, the setting reading the fewest bytes is chosen, beyond it the fastest."""
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path))
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    _, by_bytes = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER, measure=False)
    order = sorted(_met(by_bytes), key=lambda e: e["bytes_fraction"])
    cheapest, costliest = order[0], order[-1]
    assert cheapest["bytes_fraction"] < costliest["bytes_fraction"]
    ms = {pair_name(e["rank"], e["candidates"]): 2.0 for e in order}
    ms[pair_name(costliest["rank"], costliest["candidates"])] = 1.0
    ms[pair_name(cheapest["rank"], cheapest["candidates"])] = slower
    head, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=RANKS, candidates=LADDER,
                               timer=FakeTimer(lambda name: 10.0 if name == "dense" else ms[name]))
    want = cheapest if slower <= 1 + auto_mod.TIME_TIE else costliest
    assert (head.rank, head.candidates) == (want["rank"], want["candidates"])
    assert report["chosen"]["ms"] == (slower if want is cheapest else 1.0)


def test_domain_folds_leave_each_domain_out():
    """Each fold's second moment is that of every other domain's states (from per-domain sums, no copy),
    its check states are its own domain's, evenly spaced, at most ``per_domain``; the last return is
    all states' second moment."""
    from hire.proxies.lowrank import second_moment

    g = torch.Generator().manual_seed(0)
    states = torch.randn(300, 12, generator=g)
    domains = torch.tensor([0] * 100 + [1] * 120 + [2] * 80)
    folds, sigma = auto_mod.domain_folds(states, domains, per_domain=50)
    assert len(folds) == 3
    torch.testing.assert_close(sigma, second_moment(states))
    for d, fold in enumerate(folds):
        mine = states[domains == d]
        torch.testing.assert_close(fold.sigma, second_moment(states[domains != d]))
        assert fold.check.shape == (50, 12)
        assert all(any(torch.equal(row, m) for m in mine) for row in fold.check)
        assert torch.equal(fold.check[0], mine[0]) and torch.equal(fold.check[-1], mine[-1])
    few, _ = auto_mod.domain_folds(states, domains, per_domain=1000)
    assert [f.check.shape[0] for f in few] == [100, 120, 80]


def test_a_four_bit_factor_is_tried_with_the_local_top_k_only(states, monkeypatch):
    """A 4-bit U runs natively only block-major: with blocks, each rank is tried with the local top-k
    alone, ranks up to half the width (the bytes of an 8-bit quarter)."""
    monkeypatch.setattr(auto_mod, "MIN_BLOCK_ROWS", 16)
    model, fit, check = states
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank", rank_bits=4)
    width = head_weight(model).shape[1]
    _, report = choose_head(model, cfg, fit, check, *TARGETS, ranks=(8, 16, width // 2, width), candidates=LADDER,
                            measure=False, blocks=(8,))
    assert {e["rank"] for e in report["tried"]} == {8, 16, width // 2}
    assert all(e["select_blocks"] == 8 for e in report["tried"] if not e.get("skipped"))
    assert _met(report) and report["chosen"]["select_blocks"] == 8


def test_bfloat16_states_are_float32_tensors_near_the_float32_ones():
    model = make("llama")
    windows = torch.randint(0, VOCAB, (2, 32))
    exact = collect_head_states(model, windows, progress=False)
    fast = collect_head_states(model, windows, progress=False, bfloat16=True)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape and not torch.equal(fast, exact)
    assert ((fast - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_a_first_run_in_the_codes_computes_its_states_in_bfloat16_where_the_cpu_does(tmp_path, monkeypatch, cpu_bf16):
    """An auto head over GGUF codes (a model the project has no settings for, as users bring it) gets its
    calibration passes in bfloat16 on a CPU that multiplies bfloat16 in hardware; the choice and the proxy
    are cached apart from float32 ones."""
    from hire.calibrate import proxy_cache
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    write_gguf(path)
    monkeypatch.setattr(auto_mod, "measure_head_times", FakeTimer(lambda name: 2.0 if name == "dense" else 1.0))
    monkeypatch.setattr(prepare_mod, "native_bfloat16", lambda: cpu_bf16)
    seen = []

    def recorded(model, windows, progress=True, max_states=None, bfloat16=False):
        seen.append(bfloat16)
        return collect_head_states(model, windows, progress=False, bfloat16=bfloat16)

    monkeypatch.setattr(prepare_mod, "collect_head_states", recorded)
    monkeypatch.setattr(proxy_cache, "collect_head_states", recorded)
    config = HiReConfig(head=HeadConfig(k=8, auto=True, proxy="lowrank"))
    first = prepare_mod.prepare_model(str(path), config, seq_len=32, calib_windows=8, progress=False, quantized=True)
    assert seen == [cpu_bf16] and first.head_proxy is not None
    prepare_mod.prepare_model(str(path), config, seq_len=32, calib_windows=8, progress=False, quantized=True)
    assert seen == [cpu_bf16]  # both cached
    monkeypatch.setattr(prepare_mod, "native_bfloat16", lambda: not cpu_bf16)
    prepare_mod.prepare_model(str(path), config, seq_len=32, calib_windows=8, progress=False, quantized=True)
    assert seen == [cpu_bf16, not cpu_bf16]  # states of the other kind: chosen and fitted again


def test_a_rank_that_cannot_meet_the_targets_stops_scoring_its_folds(states, monkeypatch):
    """Once perfect recall on the folds left could not lift a rank to the targets, its other folds are not
    scored: the entry says after how many, and the choice is the one scoring every fold makes."""
    model, fit, check = states
    everything = torch.cat([fit, check])
    domains = torch.arange(everything.shape[0]) % 4
    folds = auto_mod.domain_folds(everything, domains, per_domain=40)
    cfg = HeadConfig(k=8, auto=True, proxy="lowrank")
    run = lambda: choose_head(model, cfg, None, None, 0.97, 0.95, ranks=(1, 2, 16), candidates=(16, 32, 64),  # noqa: E731
                              measure=False, folds=folds)
    _, stopped = run()
    monkeypatch.setattr(auto_mod, "STOP_HOPELESS", False)
    _, full = run()
    early = [e for e in stopped["tried"] if "folds_scored" in e]
    assert early and all(e["candidates"] is None and e["folds_scored"] < 4 for e in early)
    assert not any("folds_scored" in e for e in full["tried"])
    assert stopped["chosen"] == full["chosen"] and stopped["by"] == full["by"]
    assert [e["candidates"] for e in stopped["tried"]] == [e["candidates"] for e in full["tried"]]
