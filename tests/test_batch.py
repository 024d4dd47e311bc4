"""Batched decoding (hire.engine.batch) and the server's decode loop (hire.serve.scheduler) on tiny
models: every row of a batched step is what the one-token step gives it, HiRE's unions contain each
row's own selection, and sequences joining and leaving the batch decode what they decode alone."""

from __future__ import annotations

import threading

import pytest
import torch

from hire import native
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import BatchDecoder, Engine
from hire.quant import load_quantized
from hire.serve.scheduler import Sampling, Scheduler, SchedulerStopped, Sequence
from tiny_models import VOCAB, make

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

HEAD = HeadConfig(k=8, candidates=64, proxy="int8", group_size=64)


@pytest.fixture(scope="module")
def gguf_engine(tmp_path_factory):
    from test_quant import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path)
    return Engine(load_quantized(path)[0], None, dtype=torch.float32, max_seq_len=48)


def _prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3 + 2 * i,), generator=g) for i in range(n)]


def _solo_step_rows(engine: Engine, decoder: BatchDecoder, tokens, positions, slots, hire: bool) -> torch.Tensor:
    """Each row through the one-token native step, in the slot's cache (copied to the engine's)."""
    rows = []
    for t, pos, slot in zip(tokens.tolist(), positions, slots):
        engine.k_cache.copy_(decoder.k[slot])
        engine.v_cache.copy_(decoder.v[slot])
        h = engine.embed(torch.tensor([t])).float()
        rows.append(engine.native_steps[hire].step(h, pos))
    return torch.cat(rows)


def _head_engine() -> Engine:
    """A tiny Llama with a HiRE head (int8 proxy, k' 64 of 384) and dense FFNs."""
    return Engine(make("llama", seed=4), HiReConfig(head=HEAD, ffn=FFNConfig(enabled=False)),
                  dtype=torch.float32, max_seq_len=48)


def _prefilled(engine: Engine, prompts: list[torch.Tensor]) -> tuple[BatchDecoder, list[int], list[int]]:
    decoder = BatchDecoder(engine, len(prompts) + 1, dense_above=1.0)
    slots = [decoder.acquire() for _ in prompts]
    for slot, p in zip(slots, prompts):
        decoder.prefill(slot, p)
    return decoder, slots, [p.numel() for p in prompts]


@needs_kernels
def test_a_batched_step_over_gguf_codes_gives_each_row_its_one_token_step(gguf_engine):
    prompts = _prompts(3)
    decoder, slots, positions = _prefilled(gguf_engine, prompts)
    tokens = torch.tensor([5, 9, 5])
    solo = _solo_step_rows(gguf_engine, decoder, tokens, positions, slots, hire=False)
    batch = decoder.step(tokens, positions, slots, hire=False)
    assert torch.equal(batch.float(), solo)  # the same kernels' arithmetic per row: equal, not close


@needs_kernels
def test_sparse_ffn_rows_share_the_union_of_their_neurons():
    cfg = HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.5, proxy="int4"))
    engine = Engine(make("llama", seed=3), cfg, dtype=torch.float32, max_seq_len=48)
    keep = engine.ffns[0].keep_groups
    prompt = _prompts(1)[0]
    # three copies of one sequence: the union is each row's own selection, and each row its solo step
    decoder, slots, positions = _prefilled(engine, [prompt] * 3)
    tokens = torch.tensor([7, 7, 7])
    solo = _solo_step_rows(engine, decoder, tokens, positions, slots, hire=True)
    batch = decoder.step(tokens, positions, slots, hire=True)
    torch.testing.assert_close(batch.float(), solo, rtol=1e-5, atol=1e-5)
    assert decoder.stats.ffn_union == keep * len(engine.ffns)
    # different sequences: a larger union, at most every row's selection
    decoder, slots, positions = _prefilled(engine, _prompts(3, seed=1))
    decoder.step(torch.tensor([1, 50, 200]), positions, slots, hire=True)
    mean = decoder.stats.ffn_union / decoder.stats.ffn_layer_steps
    assert keep < mean <= min(3 * keep, engine.ffns[0].groups)


@needs_kernels
def test_the_head_union_holds_every_rows_candidates_with_exact_logits():
    engine = _head_engine()
    decoder = BatchDecoder(engine, 3, dense_above=1.0)
    hidden = torch.randn(3, engine.hidden)
    logits, idx = decoder.logits(hidden, hire=True)
    union = idx[0]
    assert torch.equal(idx, union.expand(3, -1)) and torch.equal(union, union.unique())
    for j in range(3):
        own = engine.head.selector.decode_select(hidden[j : j + 1])[0]
        assert torch.isin(own, union).all()
    assert HEAD.candidates <= union.numel() <= 3 * HEAD.candidates
    exact = hidden @ engine.head_weight.float()[union].T
    torch.testing.assert_close(logits, exact, rtol=1e-4, atol=1e-4)
    assert decoder.stats.head_union == union.numel() and decoder.stats.steps == 1
    # past dense_above the whole head is read
    decoder.dense_above = HEAD.candidates / VOCAB
    logits, idx = decoder.logits(hidden, hire=True)
    assert idx is None and logits.shape == (3, VOCAB) and decoder.stats.head_dense == 1


def test_bad_decoder_settings_are_refused():
    engine = Engine(make("llama"), None, dtype=torch.float32, max_seq_len=16)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        BatchDecoder(engine, 0)
    with pytest.raises(ValueError, match="dense_above must be in"):
        BatchDecoder(engine, 2, dense_above=0)
    decoder = BatchDecoder(engine, 1)
    slot = decoder.acquire()
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        decoder.acquire()
    with pytest.raises(ValueError, match="does not fit a context of 16"):
        decoder.prefill(slot, torch.zeros(16, dtype=torch.long))
    decoder.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        decoder.release(slot)


@pytest.mark.parametrize("chunk", [128, 3])
@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_kernels), False])
def test_the_decode_loop_gives_each_sequence_what_it_decodes_alone(fused, chunk):
    """Sequences of different lengths join a running batch and leave it (length, cancel); the
    greedy tokens of each equal Engine.generate's for it alone, on the native and the eager path,
    their prompts prefilled whole or 3 tokens at a time between decode steps."""
    engine = Engine(make("llama", seed=2), None, dtype=torch.float32, max_seq_len=48, fused=fused)
    prompts = _prompts(4, seed=3)
    want = [engine.generate(p, 10, hire=False).token_ids for p in prompts]
    scheduler = Scheduler(BatchDecoder(engine, 2), hire=False, prefill_chunk=chunk)  # 2 slots for 4 requests: two wait
    ended = threading.Semaphore(0)
    got: list[list] = [[] for _ in prompts]

    def emit_for(i):
        def emit(event):  # on the decode thread: must not block
            got[i].append(event)
            if event[0] == "end":
                ended.release()
        return emit

    seqs = [Sequence(p, 10, Sampling(), frozenset(), emit_for(i)) for i, p in enumerate(prompts)]
    doomed = Sequence(prompts[0], 40, Sampling(), frozenset(), lambda e: None)
    scheduler.start()
    scheduler.submit(doomed)
    scheduler.cancel(doomed)  # cancelled while waiting or running: its slot comes back
    for s in seqs:
        scheduler.submit(s)
    for _ in seqs:
        assert ended.acquire(timeout=60)
    for i, events in enumerate(got):
        assert [e[1] for e in events if e[0] == "token"] == want[i]
        assert events[-1] == ("end", "length", "")
    assert sorted(scheduler.decoder.free) == [0, 1] and scheduler.stats.cancelled == 1
    assert scheduler.stats.summary()["mean_batch"] > 1  # they did share steps
    scheduler.stop()
    with pytest.raises(SchedulerStopped):
        scheduler.submit(seqs[0])


@pytest.mark.parametrize("fuse", [pytest.param(True, marks=needs_kernels), False])
def test_a_long_prompt_is_prefilled_between_the_running_sequence_s_steps(fuse):
    """While a sequence decodes, a long prompt joins in chunks: each chunk is followed by a decode step of the
    running sequence (not one prefill of the whole prompt), or with the native step rides in it (one call:
    the weights read once for both), and both get what they decode alone."""
    engine = Engine(make("llama", seed=2), None, dtype=torch.float32, max_seq_len=64)
    short, long = _prompts(1, seed=3)[0][:4], torch.arange(2, 32) % 300
    want = [engine.generate(p, 12, hire=False).token_ids for p in (short, long)]
    decoder = BatchDecoder(engine, 2)
    calls = []
    prefill, step = decoder.prefill, decoder.step

    def logged_prefill(slot, prompt, start=0):
        calls.append(("prefill", start, prompt.numel()))
        return prefill(slot, prompt, start)

    def logged_step(tokens, positions, slots, hire):
        calls.append(("step", len(positions)))
        return step(tokens, positions, slots, hire)

    fused = decoder.step_with_prefill

    def logged_fused(tokens, positions, slots, hire, chunk, slot, start):
        calls.append(("prefill", start, chunk.numel()))
        calls.append(("step", len(positions)))
        return fused(tokens, positions, slots, hire, chunk, slot, start)

    decoder.prefill, decoder.step, decoder.step_with_prefill = logged_prefill, logged_step, logged_fused
    if not fuse:
        decoder.can_fuse_prefill = lambda hire: False
    scheduler = Scheduler(decoder, hire=False, prefill_chunk=8, max_stall=0)  # chunks of 8, not sized by time
    got, done = [[], []], [threading.Event(), threading.Event()]

    def emit_for(i):
        def emit(event):
            if event[0] == "token":
                got[i].append(event[1])
                if i == 0 and len(got[0]) == 2:  # the short one runs: the long prompt arrives
                    scheduler.submit(Sequence(long, 12, Sampling(), frozenset(), emit_for(1)))
            else:
                done[i].set()
        return emit

    scheduler.start()
    scheduler.submit(Sequence(short, 12, Sampling(), frozenset(), emit_for(0)))
    assert done[0].wait(60) and done[1].wait(60)
    scheduler.stop()
    assert got == want
    prefills = [c for c in calls if c[0] == "prefill"]
    chunks = prefills[1:]  # the long prompt's (the short one's came first, whole)
    assert prefills[0] == ("prefill", 0, short.numel())
    assert [c[1:] for c in chunks] == [(0, 8), (8, 8), (16, 8), (24, 6)]
    after = [calls[calls.index(c) + 1] for c in chunks[:-1]]
    assert after == [("step", 1)] * 3  # the running sequence stepped between the chunks
    assert scheduler.stats.prefills == 2 and scheduler.stats.prefill_tokens == short.numel() + 30


def test_stop_tokens_and_sampling_seeds():
    engine = Engine(make("llama", seed=2), None, dtype=torch.float32, max_seq_len=48)
    prompt = _prompts(1, seed=5)[0]
    greedy = engine.generate(prompt, 6, hire=False).token_ids
    assert len(set(greedy)) > 1  # (the test needs a token that ends the greedy text early)
    events = []
    finished = threading.Event()

    def run(seq):
        scheduler = Scheduler(BatchDecoder(engine, 1), hire=False)
        scheduler.start()
        scheduler.submit(seq)
        assert finished.wait(30)
        scheduler.stop()
        finished.clear()

    def emit(event):
        events.append(event)
        if event[0] == "end":
            finished.set()

    first_new = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    run(Sequence(prompt, 6, Sampling(), frozenset({greedy[first_new]}), emit))  # that token stops it, unsent
    assert [e[1] for e in events if e[0] == "token"] == greedy[:first_new] and events[-1][1] == "stop"
    samples = []
    for _ in range(2):
        events.clear()
        run(Sequence(prompt, 6, Sampling(temperature=1.0, seed=7), frozenset(), emit))
        samples.append([e[1] for e in events if e[0] == "token"])
    assert samples[0] == samples[1]  # one seed, one sample


@needs_kernels
def test_a_prompt_prefills_as_batched_steps(gguf_engine, monkeypatch):
    """Engine.prefill runs a prompt as step_batch calls of PREFILL_CHUNK tokens in its slot: below 6
    rows (qgemv's own products) exactly what feeding its tokens one at a time through the decode
    step gives; in chunks, what one call gives to float32 rounding; close to the eager prefill."""
    import hire.engine.engine as engine_module

    e = gguf_engine
    prompt = _prompts(1, seed=9)[0][:5]
    stepped = e.prefill(prompt).float()
    caches = e.k_cache.clone(), e.v_cache.clone()
    for t, tok in enumerate(prompt.tolist()):
        one = e.native_steps[False].step(e.embed(torch.tensor([tok])).float(), t)
    assert torch.equal(stepped, one.float())
    assert torch.equal(e.k_cache[:, :, :5], caches[0][:, :, :5])
    eager = e.eager_forward(e.embed(prompt).float(), 0, hire=False).float()
    torch.testing.assert_close(stepped, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())
    decoder = BatchDecoder(e, 2)
    with pytest.raises(RuntimeError, match="increasing positions"):
        e.native_steps[False].step_batch(e.embed(prompt[:2]).float(), torch.tensor([3, 2]), torch.tensor([0, 0]),
                                         decoder.k, decoder.v)
    long = torch.randint(0, VOCAB, (40,))
    whole = e.prefill(long).float()
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 16)
    torch.testing.assert_close(e.prefill(long).float(), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_a_large_batch_reads_the_whole_head_without_selecting():
    engine = _head_engine()
    decoder = BatchDecoder(engine, 4, dense_batch=3)
    hidden = torch.randn(3, engine.hidden)
    logits, idx = decoder.logits(hidden, hire=True)
    assert idx is None and logits.shape == (3, VOCAB)
    assert decoder.stats.batch_dense == 1 and decoder.stats.steps == 0
    assert decoder.logits(hidden[:2], hire=True)[1] is not None  # below it: candidates
    with pytest.raises(ValueError, match="dense_batch must be >= 1"):
        BatchDecoder(engine, 2, dense_batch=0)


def test_a_chunk_takes_at_most_max_stall_decode_steps_while_sequences_decode():
    engine = Engine(make("llama", seed=2), None, dtype=torch.float32, max_seq_len=16)
    scheduler = Scheduler(BatchDecoder(engine, 1), hire=False, prefill_chunk=128, max_stall=2.0)
    scheduler.step_s, scheduler.token_s = {1: 0.010}, 0.008
    assert scheduler.chunk_size(1, fused=True) == 2 and scheduler.chunk_size(1) == 8  # alone: MIN_CHUNK
    scheduler.step_s, scheduler.token_s = {}, None
    assert scheduler.chunk_size(0) == 128  # nobody waits: the largest chunk
    assert scheduler.chunk_size(1) == 8  # nothing measured yet: MIN_CHUNK
    scheduler.step_s, scheduler.token_s = {1: 0.010}, 0.001  # a step of 1 sequence 10 ms, a prompt token 1 ms
    assert scheduler.chunk_size(1) == 20  # 2 steps' time
    assert scheduler.chunk_size(3) == 8  # a step of 3 not measured yet
    scheduler.step_s = {1: 0.002}
    assert scheduler.chunk_size(1) == 8  # never below MIN_CHUNK
    scheduler.step_s = {1: 1.0}
    assert scheduler.chunk_size(1) == 128  # never above prefill_chunk
    scheduler.step_s = {1: 0.010}
    assert scheduler.chunk_size(1, remaining=80) == 80  # within 4 chunks of 20: whole
    assert scheduler.chunk_size(1, remaining=81) == 20
    assert Scheduler(BatchDecoder(engine, 1), hire=False, prefill_chunk=64, max_stall=0).chunk_size(1) == 64
    with pytest.raises(ValueError, match="max_stall must be >= 0"):
        Scheduler(BatchDecoder(engine, 1), hire=False, max_stall=-1)
