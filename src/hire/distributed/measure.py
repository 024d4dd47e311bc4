"""What ``hire bench --tp P`` and ``hire eval --tp P`` measure: per mode, decode tokens/s
(interleaved rounds, medians), collectives and bytes exchanged per token, DA-TOP-k's recall of
the exact global top-k, greedy agreement with the single-process engine, perplexity."""

from __future__ import annotations

import math
import os
import statistics

import torch

from hire.calibrate.prepare import load_for_decode
from hire.data import CALIBRATION_WINDOWS, load_corpus, token_windows
from hire.distributed.comm import launch, launched_by_torchrun, main_rank_first, tp_group
from hire.distributed.tp import MODES, TPEngine
from hire.engine import Engine
from hire.files import refuse_overwrite
from hire.plots import plot_tp_bench
from hire.system import available_cores

SELECTION_KINDS = ("ffn_select", "head_select")


def _run(engine: TPEngine, prompt: torch.Tensor, tokens: int, mode: str):
    engine.set_mode(mode)
    return engine.generate(prompt, tokens, hire=mode != "dense")


def collectives_per_token(engine: TPEngine, prompt: torch.Tensor, tokens: int, mode: str) -> dict:
    """Collectives and bytes (this rank's messages) per decode step, by kind: an n-token run minus
    a one-token run (the prefill and its token), over n - 1 steps."""
    before = engine.comm.snapshot()
    _run(engine, prompt, 1, mode)
    mid = engine.comm.snapshot()
    _run(engine, prompt, tokens, mode)
    after = engine.comm.snapshot()
    steps = tokens - 1
    out = {}
    for i, name in ((0, "collectives"), (1, "bytes")):
        decode = after[i] - mid[i]
        decode.subtract(mid[i] - before[i])
        out[name] = {kind: v / steps for kind, v in sorted(decode.items()) if v}
    return out


def forced_predictions(engine: Engine, prompt: torch.Tensor, reference: list[int], hire: bool) -> list[int]:
    """Teacher-forced on ``reference`` (the single-process greedy tokens after ``prompt``): the
    greedy token ``engine`` picks at each of its positions."""
    forced = torch.cat([prompt.reshape(-1), torch.tensor(reference)])
    return engine.teacher_forced(forced, hire=hire, start=prompt.numel())[0][: len(reference)]


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(b)


def tp_bench(engine: TPEngine, reference: Engine, prompt: torch.Tensor, *, tokens: int = 64, rounds: int = 5,
             warmup: int = 1, modes=MODES, progress: bool = True) -> dict:
    """Every mode in the same run, rounds interleaved (dense, exact, da, dense, ...), with the
    single-process engine ``reference`` over the same (patched) model as the yardstick."""
    from tqdm.auto import tqdm

    if tokens < 2:
        raise ValueError(f"--tokens must be >= 2 to time decode steps, got {tokens}")
    ref = {"dense": reference.generate(prompt, tokens, hire=False).token_ids,
           "hire": reference.generate(prompt, tokens, hire=True).token_ids}
    for mode in modes:
        for _ in range(warmup):
            _run(engine, prompt, tokens, mode)
    speeds = {mode: [] for mode in modes}
    last = {}
    for _ in tqdm(range(rounds), desc=f"bench rounds ({', '.join(modes)})", disable=not progress):
        for mode in modes:
            stats = _run(engine, prompt, tokens, mode)
            speeds[mode].append(stats.tokens_per_s)
            last[mode] = stats.token_ids
    # the same model in one process with one rank's threads, timed meanwhile on every rank (no collectives)
    single = {name: statistics.median(reference.generate(prompt, tokens, hire=name == "hire").tokens_per_s
                                      for _ in range(3)) for name in ("dense", "hire")}
    result = {"tp": engine.comm.world, "new_tokens": tokens, "single_process_tokens_per_s": single, "prompt_tokens": int(prompt.numel()), "rounds": rounds,
              "threads_per_rank": torch.get_num_threads(), "dtype": str(engine.dtype).replace("torch.", ""),
              "heads_per_rank": [len(h) for h in engine.heads], "modes": {}}
    preds = {}
    for mode in tqdm(modes, desc="counting, agreement, recall", disable=not progress):
        counts = collectives_per_token(engine, prompt, tokens, mode)
        target = ref["dense" if mode == "dense" else "hire"]
        engine.set_mode(mode)
        engine.track(mode != "dense")
        preds[mode] = forced_predictions(engine, prompt, target, hire=mode != "dense")
        recall = engine.recall() if mode != "dense" else {}
        engine.track(False)
        tps = statistics.median(speeds[mode])
        result["modes"][mode] = {
            "tokens_per_s": tps,
            "ms_per_token": 1000 / tps if tps else None,
            "tokens_per_s_rounds": speeds[mode],
            "collectives_per_token": sum(counts["collectives"].values()),
            "selection_collectives_per_token": sum(counts["collectives"].get(k, 0) for k in SELECTION_KINDS),
            "collectives_per_token_by_kind": counts["collectives"],
            "bytes_exchanged_per_token": sum(counts["bytes"].values()),
            "bytes_exchanged_per_token_by_kind": counts["bytes"],
            # the FFN's kept neurons vs the exact global top-k (dense keeps all; exact is it)
            "recall_vs_exact": 1.0 if mode in ("dense", "exact") or recall.get("ffn") is None else recall["ffn"],
            "head_recall_vs_exact": recall.get("head_recall_at_k", 1.0 if mode == "dense" else None),
            "head_top1_vs_exact": recall.get("head_top1", 1.0 if mode == "dense" else None),
            "greedy_agreement": agreement(preds[mode], target),
            "greedy_reference": "single-process dense" if mode == "dense" else "single-process HiRE (exact top-k)",
            "greedy_tokens_equal": last[mode] == target,
        }
    m = result["modes"]
    if "exact" in preds and "da" in preds:  # the same forced tokens, the same TP engine: only the selection differs
        m["da"]["greedy_agreement_vs_exact_mode"] = agreement(preds["da"], preds["exact"])
    if "exact" in m and "da" in m:
        result["da_vs_exact_speedup"] = m["da"]["tokens_per_s"] / m["exact"]["tokens_per_s"]
    if "dense" in m and "da" in m:
        result["da_vs_dense_speedup"] = m["da"]["tokens_per_s"] / m["dense"]["tokens_per_s"]
    return result


def tp_eval(engine: TPEngine, reference: Engine, windows: list[torch.Tensor], *, modes=MODES,
            progress: bool = True) -> dict:
    """Teacher-forced decoding, one token per step, over ``windows``: perplexity (exact
    vocabulary-parallel log-softmax), greedy agreement with the single-process engine at every
    position, and DA-TOP-k's recall of the exact global top-k."""
    from tqdm.auto import tqdm

    def passes(eng, hire, track=False):
        preds, logp, count = [], 0.0, 0
        for w in windows:
            p, lp = eng.teacher_forced(w, hire=hire, start=1, log_probs=True)
            preds += p[:-1]
            logp += lp
            count += w.numel() - 1
        return preds, math.exp(-logp / count), count

    bar = tqdm(total=len(modes) + 2, desc="tp eval passes", disable=not progress)
    ref = {}
    for name, hire in (("dense", False), ("hire", True)):
        ref[name] = passes(reference, hire)
        bar.update()
    out = {"tp": engine.comm.world, "windows": len(windows), "positions": ref["dense"][2],
           "single_process": {"dense_perplexity": ref["dense"][1], "hire_perplexity": ref["hire"][1]}, "modes": {}}
    all_preds = {}
    for mode in modes:
        engine.set_mode(mode)
        engine.track(mode != "dense")
        preds, ppl, _ = passes(engine, mode != "dense")
        recall = engine.recall() if mode != "dense" else {}
        engine.track(False)
        target = ref["dense" if mode == "dense" else "hire"][0]
        all_preds[mode] = preds
        out["modes"][mode] = {
            "perplexity": ppl,
            "perplexity_change_vs_dense": ppl / ref["dense"][1] - 1,
            "perplexity_change_vs_single_process": ppl / ref["dense" if mode == "dense" else "hire"][1] - 1,
            "greedy_agreement": agreement(preds, target),
            "greedy_reference": "single-process dense" if mode == "dense" else "single-process HiRE (exact top-k)",
            "recall_vs_exact": 1.0 if mode in ("dense", "exact") or recall.get("ffn") is None else recall["ffn"],
            "head_recall_vs_exact": recall.get("head_recall_at_k", 1.0 if mode == "dense" else None),
        }
        bar.update()
    bar.close()
    if "exact" in all_preds and "da" in all_preds:
        da, exact, single = all_preds["da"], all_preds["exact"], ref["hire"][0]
        out["modes"]["da"]["greedy_agreement_vs_exact_mode"] = agreement(da, exact)
        # positions where float summation order alone does not move HiRE's greedy token (the exact mode
        # agrees with the single-process engine there): DA's own effect, beyond that noise floor
        stable = [i for i, (e, r) in enumerate(zip(exact, single)) if e == r]
        out["modes"]["da"]["stable_positions"] = len(stable)
        out["modes"]["da"]["greedy_agreement_vs_exact_mode_at_stable_positions"] = (
            agreement([da[i] for i in stable], [exact[i] for i in stable]) if stable else None)
    return out


def run_tp(
    command: str,
    argv: list[str],
    model_name: str,
    config,
    *,
    tp: int,
    modes=MODES,
    timeout: float = 300.0,
    threads: int | None = None,
    dtype: str = "float16",
    seq_len: int = 512,
    calib_windows: int = CALIBRATION_WINDOWS,
    prompt: str = "",
    tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    windows: int = 2,
    plot=None,
    force: bool = False,
    progress: bool = True,
) -> dict | int:
    """`hire bench --tp P` (``command="bench"``: :func:`tp_bench`) and `hire eval --tp P`
    (``command="eval"``: :func:`tp_eval` on ``windows`` evaluation windows of ``seq_len`` tokens).

    Outside torchrun with ``tp > 1`` it launches ``hire argv`` on ``tp`` ranks and returns their exit
    status (an int). As one rank it joins the group, loads the model (rank 0 first: it fills the
    caches), measures, and returns the report on rank 0 (a dict, plotted at ``plot``) and 0 on the
    others, which have nothing to print.
    """

    if command not in ("bench", "eval"):
        raise ValueError(f"run_tp measures 'bench' or 'eval', not {command!r}")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {','.join(modes)!r}")
    if plot:
        refuse_overwrite(plot, force, "--plot")
    if tp > 1 and not launched_by_torchrun():
        return launch(argv, tp, threads)
    with tp_group(tp, timeout) as comm:  # every rank leaves the group in a safe order, however the block ends
        threads = threads or os.environ.get("HIRE_TP_THREADS")  # set by launch(): cores // tp
        torch.set_num_threads(int(threads) if threads else max(1, available_cores() // comm.world))
        comm.check_same("command line", " ".join(argv))
        quiet = not progress or not comm.is_main
        with main_rank_first(comm, max(timeout, 3600)):
            # float weights: tensor parallel splits 16-bit matrices, not GGUF block codes
            prepared = load_for_decode(model_name, config, quantized=False, seq_len=seq_len, calib_windows=calib_windows,
                                       progress=not quiet)
            model, tokenizer, head_proxy, config = prepared.model, prepared.tokenizer, prepared.head_proxy, prepared.config
        torch_dtype = getattr(torch, dtype)
        if command == "bench":
            ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
            length = ids.numel() + tokens + 1
        else:
            held = list(token_windows(tokenizer, load_corpus().text("evaluation"), seq_len, windows))
            length = seq_len + 1
        engine = TPEngine(model, config, comm, head_proxy=head_proxy, dtype=torch_dtype, max_seq_len=length)
        reference = Engine(model, None, dtype=torch_dtype, max_seq_len=length)  # the same patched model, one process
        if command == "bench":
            result = tp_bench(engine, reference, ids, tokens=tokens, rounds=rounds, warmup=warmup, modes=modes,
                              progress=not quiet)
        else:
            result = tp_eval(engine, reference, held, modes=modes, progress=not quiet)
        result.update(model=model_name, backend="gloo" if comm.world > 1 else "single process",
                      config=config.to_dict())
        if not comm.is_main:
            return 0
        if plot:
            plot_tp_bench(result, plot)
            result["plot"] = str(plot)
    return result
