"""Tensor parallel + DA-TOP-k: 2 gloo processes under torchrun (tests/tp_worker.py), and the
one-rank engine in this process."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.distributed import Comm, TPEngine, check_tp, global_topk, head_split, init_tp, shard_range, split_count
from hire.distributed.comm import CommError, TPSetupError, tp_group
from hire.engine import Engine
from hire.errors import HireError
from hire.topk import ranked_topk
from tiny_models import make

WORKER = Path(__file__).parent / "tp_worker.py"
PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11, 64, 2, 33, 120])


def torchrun(scenario: str, out: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5",
           str(WORKER), scenario, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def ranks(out: Path) -> list:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# --- pure pieces ---------------------------------------------------------------------------------
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 3), st.data())
def test_global_topk_on_one_rank_is_torch_topk(n, world_dummy, rows, data):
    k = data.draw(st.integers(1, n))
    scores = torch.randperm(rows * n).float().view(rows, n)
    values, idx = global_topk(scores, 0, k, Comm(), "test")
    want = scores.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(idx, want.indices)


@given(st.integers(1, 40), st.integers(1, 3), st.data())
def test_global_topk_breaks_ties_by_the_lowest_global_row(n, rows, data):
    """The selection rule's order (hire.topk.ranked_topk), so that TP's exact mode selects what one
    process selects, ties included; with explicit indices too."""
    k = data.draw(st.integers(1, n))
    scores = torch.randint(0, 3, (rows, n)).float()
    want_values, want_pos = ranked_topk(scores, k)
    values, idx = global_topk(scores, 5, k, Comm(), "test")
    assert torch.equal(values, want_values) and torch.equal(idx, want_pos + 5)
    perm = torch.randperm(n).expand(rows, n)  # the global row of each column
    values, idx = global_topk(scores, perm, k, Comm(), "test")
    want_values, want_pos = ranked_topk(scores, k, perm)
    assert torch.equal(values, want_values) and torch.equal(idx, perm.gather(-1, want_pos))


@given(st.integers(0, 200), st.integers(1, 8))
def test_split_count_shares_sum_to_the_count_and_differ_by_at_most_one(count, world):
    shares = [split_count(count, r, world) for r in range(world)]
    assert sum(shares) == count and max(shares) - min(shares) <= 1


@given(st.integers(1, 16), st.integers(1, 8), st.data())
def test_head_split_covers_every_query_head_once(kv, world, data):
    heads = kv * data.draw(st.integers(1, 4))
    if heads < world:
        return
    parts = [head_split(heads, kv, r, world) for r in range(world)]
    assert sorted(h for q, _ in parts for h in q) == list(range(heads))
    group = heads // kv
    for q, held in parts:
        assert q and {h // group for h in q} == set(held)


def test_shard_range_refuses_an_uneven_split():
    assert shard_range(12, 1, 3) == (4, 8)
    with pytest.raises(ValueError, match="do not split evenly"):
        shard_range(10, 0, 3)


def test_check_tp_names_every_shape_that_does_not_split():
    model = make("llama")
    with pytest.raises(ValueError, match="4 attention heads cannot give each of 8 ranks"):
        check_tp(model, HiReConfig(), 8)
    with pytest.raises(ValueError, match="FFN width 128 does not split into 3 ranks"):
        check_tp(model, HiReConfig(), 3)
    check_tp(model, HiReConfig(), 2)
    from hire.layers import apply_topk_

    apply_topk_(model, 0.5)
    with pytest.raises(ValueError, match="does not run top-k-trained FFNs"):
        check_tp(model, HiReConfig(), 2)


def test_init_tp_without_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert init_tp(1).world == 1
    with pytest.raises(TPSetupError, match="torchrun --nproc_per_node=2"):
        init_tp(2)


def test_comm_errors_are_hire_errors_the_cli_prints():
    assert issubclass(CommError, HireError) and issubclass(CommError, RuntimeError)
    assert issubclass(TPSetupError, HireError) and issubclass(TPSetupError, ValueError)


def test_tp_group_of_one_process_has_nothing_to_leave(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with tp_group(1) as comm:
        assert comm.world == 1
    with pytest.raises(KeyError), tp_group(1):
        raise KeyError("the error passes through")


# --- one rank: DA-TOP-k and the exact mode are single-process HiRE ------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])
@pytest.mark.parametrize("ffn", [FFNConfig(density=0.5, oversample=1.25), FFNConfig(density=0.4, group_size=4),
                                 FFNConfig(density=1.0)])
def test_one_rank_da_and_exact_equal_hire(arch, ffn):
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8"), ffn=ffn)
    hire = Engine(make(arch, seed=1), cfg, dtype=torch.float32, max_seq_len=64)
    tp = TPEngine(make(arch, seed=1), cfg, Comm(), dtype=torch.float32, max_seq_len=64)
    want_dense = hire.generate(PROMPT, 12, hire=False).token_ids
    want = hire.generate(PROMPT, 12, hire=True).token_ids
    for mode in ("dense", "exact", "da"):
        tp.set_mode(mode)
        assert tp.generate(PROMPT, 12, hire=mode != "dense").token_ids == (want_dense if mode == "dense" else want), mode
    tp.set_mode("da")
    tp.track(True)
    tp.teacher_forced(torch.cat([PROMPT, torch.tensor(want)]), hire=True, start=PROMPT.numel())
    assert tp.recall() == {"ffn": 1.0, "head_recall_at_k": 1.0, "head_top1": 1.0}


def test_one_rank_cascade_head_in_both_modes_equals_hire():
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=32, proxy="cascade", rank=8, stage_candidates=96, bits=8),
                     ffn=FFNConfig(density=0.5))
    hire = Engine(make("llama", seed=2), cfg, head_proxy=_lowrank(make("llama", seed=2)), dtype=torch.float32,
                  max_seq_len=64)
    tp = TPEngine(make("llama", seed=2), cfg, Comm(), head_proxy=_lowrank(make("llama", seed=2)),
                  dtype=torch.float32, max_seq_len=64)
    want = hire.generate(PROMPT, 12, hire=True).token_ids
    for mode in ("exact", "da"):
        tp.set_mode(mode)
        assert tp.generate(PROMPT, 12, hire=True).token_ids == want, mode


def _lowrank(model):
    from hire.proxies import LowRankProxy

    return LowRankProxy.from_weight(model.lm_head.weight.detach(), 8)


def test_unknown_mode_is_refused():
    tp = TPEngine(make("llama"), HiReConfig(head=HeadConfig(proxy="int8", candidates=64, k=5)), Comm(),
                  dtype=torch.float32, max_seq_len=32)
    with pytest.raises(ValueError, match="mode must be one of"):
        tp.set_mode("approximate")


# --- two gloo processes --------------------------------------------------------------------------
def test_two_ranks_exact_global_topk_equals_single_process_topk(tmp_path):
    run = torchrun("topk", tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in ranks(tmp_path):
        for case in rank:
            assert case["values_equal"] and case["idx_equal"], case


def test_two_ranks_engine_modes(tmp_path):
    run = torchrun("engine", tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = ranks(tmp_path)
    for a, b in zip(r0, r1):
        assert a == b  # every rank returns the same tokens and measurements
    for case in r0:
        ref = case["reference"]
        # tensor-parallel dense decode is the single-process model's greedy decode; the exact mode is HiRE's
        assert case["dense"]["tokens"] == ref["dense"], case["arch"]
        assert case["exact"]["tokens"] == ref["hire"], case["arch"]
        # DA-TOP-k has no selection collective for the FFN; the exact mode has one per layer (two with oversampling)
        assert "ffn_select" not in case["da"]["counts"] and case["exact"]["counts"]["ffn_select"] > 0
        assert case["da"]["counts"]["ffn"] == case["dense"]["counts"]["ffn"]
        assert "head_select" not in case["da"]["counts"] and case["exact"]["counts"]["head_select"] > 0
        assert case["da"]["counts"]["head_topk"] == case["exact"]["counts"]["head_topk"] == 16  # one per token
        assert case["da_recall"]["ffn"] >= 0.8 and case["da_recall"]["head_recall_at_k"] >= 0.8
        assert case["log_prob_tp"] == pytest.approx(case["log_prob"], abs=1e-4)
    # 6 query heads over 2 ranks, kv head 1 split between them: each rank holds one kv head per query head
    assert r0[2]["heads"] == [3, 3]


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    t = time.monotonic()
    run = torchrun("fail", tmp_path, timeout=120)
    assert run.returncode != 0
    assert "rank 1 fails on purpose" in run.stderr
    assert "rank      : 1" in run.stderr  # torchrun names the failed rank
    assert "terminate called" not in run.stderr and "SIGABRT" not in run.stderr
    assert time.monotonic() - t < 90


def test_leaving_the_group_joins_gloos_threads_on_every_rank(tmp_path):
    """The group must be gone, with its gloo threads, when tp_group's block ends: a group that a
    late import kept alive freed its threads only while Python shut down, and a worker still
    releasing its last collective's tensors then aborted the rank ("terminate called without an
    active exception", SIGABRT) at random. Here rank 1 also returns early from the block."""
    run = torchrun("shutdown", tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "terminate called" not in run.stderr
    for rank in ranks(tmp_path):
        assert "pt_gloo_runloop" in rank["inside"] and "gloo_tcp_loop" in rank["inside"]  # the count sees them
        assert rank["after"] == []


def test_a_rank_that_stops_responding_times_out_with_a_clear_error(tmp_path):
    t = time.monotonic()
    run = torchrun("hang", tmp_path, timeout=120, env={"HIRE_TEST_TIMEOUT": "5"})
    assert run.returncode != 0
    assert "rank 0 of 2: all_reduce (test) failed" in run.stderr
    assert "stopped responding within the timeout" in run.stderr
    assert time.monotonic() - t < 90


def test_a_mismatched_world_size_is_refused_at_start(tmp_path):
    run = torchrun("mismatch", tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in ranks(tmp_path):
        assert "2 processes (WORLD_SIZE=2) but --tp 3" in rank["error"]


def test_cli_bench_tp_launches_two_ranks_and_prints_the_modes(model_dir):
    cmd = [sys.executable, "-m", "hire", "bench", "--tp", "2", "--model", model_dir, "--tokens", "6", "--rounds", "1",
           "--head-proxy", "int8", "--head-candidates", "64", "--head-k", "5", "--ffn-density", "0.5", "--json",
           "--prompt", "the king and the queen", "--dtype", "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["tp"] == 2 and set(result["modes"]) == {"dense", "exact", "da"}
    for mode in result["modes"].values():
        for key in ("tokens_per_s", "collectives_per_token", "recall_vs_exact", "greedy_agreement"):
            assert isinstance(mode[key], float | int), key
    m = result["modes"]
    assert m["da"]["selection_collectives_per_token"] == 0 < m["exact"]["selection_collectives_per_token"]
    assert m["dense"]["greedy_agreement"] == 1.0


def test_cli_eval_tp_reports_perplexity_per_mode(model_dir):
    cmd = [sys.executable, "-m", "hire", "eval", "--tp", "2", "--model", model_dir, "--windows", "1", "--seq-len", "24",
           "--head-proxy", "int8", "--head-candidates", "64", "--head-k", "5", "--ffn-density", "0.5", "--json", "--dtype", "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    dense = result["modes"]["dense"]
    assert dense["perplexity"] == pytest.approx(result["single_process"]["dense_perplexity"], rel=1e-3)
    assert result["modes"]["exact"]["greedy_agreement"] == 1.0
    da = result["modes"]["da"]
    assert da["stable_positions"] == 23 and 0 <= da["greedy_agreement_vs_exact_mode_at_stable_positions"] <= 1


def test_cli_tp_with_a_wrong_mode_is_a_clear_error(model_dir, capsys):
    from hire.cli import main

    assert main(["bench", "--tp", "2", "--model", model_dir, "--modes", "dense,fast"]) == 2
    assert "--modes takes a comma-separated subset of dense,exact,da" in capsys.readouterr().err
