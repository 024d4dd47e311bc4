"""The decode loop of the server: continuous batching over a ``BatchDecoder``. ``hire serve`` runs
it in the main thread (``Scheduler.run``; uvicorn serves HTTP from a second one, hire.serve.service);
``Scheduler.start`` runs it on a thread of its own instead (tests, an app run in process).

Requests join the running batch between steps: their prompt is prefilled densely into a free KV
cache slot a chunk at a time, so that a long prompt delays each running stream's next token by one
chunk's prefill, not by the whole prompt's. While sequences decode, the chunk rides in their decode
step (one native call, ``BatchDecoder.step_with_prefill``; where that cannot be, a step of its own
between two of theirs) and is sized to add at most ``max_stall`` decode steps' time (both measured as
the loop runs: ``chunk_size``), up to ``prefill_chunk`` tokens; with nothing decoding, or
``max_stall`` 0, it is ``prefill_chunk``. They leave when they stop, reach their length, or are
cancelled (a client that went away); their slot is then free for the next one.
Each request gets its tokens through its ``emit`` callback, called on the thread running the loop.
Each sequence samples with its own settings and generator; temperature and top-p draws account for
the rows outside the head's candidates (the batch's union) as ``Engine.generate`` does
(hire.engine.sampling; counts in ``BatchDecoder.sampling_stats``), with a ``DensePolicy`` per sequence:
after a step of its that fell back to the whole head, its next steps sample its exact logits over the
whole vocabulary (its row of the dense head) instead of building a tail bound, and probe again every
``PROBE_EVERY`` steps (its candidates still join the batch's union: the selection is not saved there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from hire.engine.batch import BatchDecoder
from hire.engine.sampling import DensePolicy, needs_tail, sample
from hire.serve.grammar import FEW_ROWS, Constraint, GrammarError

log = logging.getLogger("hire")

# prompt tokens prefilled between two decode steps of the running sequences. SmolLM2's codes prefill
# ~400 tokens/s on an AMD EPYC VM (hire bench): a 2,000-token prompt held every running stream up ~5 s
# whole, ~0.3 s a chunk of 128; per token, chunks of 32-512 cost about the same (Engine.PREFILL_CHUNK's note)
PREFILL_CHUNK = 128
# a chunk adds at most this many decode steps' time to the running streams' next token. 3 streams and a
# 2,000-token prompt (benchmarks/serve.py --stall): their p99 inter-token latency 2.8-3.1x the unloaded
# one at 1 (SmolLM2, Gemma-3), 3.8-4.4x at 2, 20-65x with fixed 128-token chunks
MAX_STALL = 1.0
MIN_CHUNK = 8  # the smallest chunk on its own: from 6 tokens a batched step's products run in vector lanes
# a prompt whose rest fits in this many chunks goes in whole: it stalls the streams once instead of
# waiting that many steps for its first token (8 short prompts arriving together, SmolLM2: first tokens
# after 635 ms at 8 streams in chunks of the stall budget, 171 ms whole)
WHOLE_WITHIN = 4
EMA = 0.3  # weight of the newest measurement in the step and per-token prefill times


class SchedulerStopped(RuntimeError):
    """The server is shutting down and takes no new requests."""


class GrammarFailed(RuntimeError):
    """A sequence's grammar left no token to choose (its request ends with an error)."""


class QueueFull(RuntimeError):
    """Every slot is busy and ``max_waiting`` requests already wait for one."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed


@dataclass(eq=False)
class Sequence:
    """One request in the decode loop. ``emit`` receives ("token", id) (with ``logprobs``: ("token", id,
    TokenLogprobs), its ``logprobs`` best alternatives listed), then one
    ("end", "stop" | "length" | "cancelled" | "error", message)."""

    prompt: torch.Tensor  # (T,) token ids
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    emit: Callable[[tuple], None]
    tokens: list[int] = field(default_factory=list)  # generated so far (a stop id included)
    prefilled: int = 0  # prompt tokens in the cache so far (prefilled in chunks)
    slot: int = -1
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    policy: DensePolicy = field(default_factory=DensePolicy)  # temperature / top-p: probe HiRE or the dense head
    logprobs: int | None = None  # None: none; else each token's log-probability and this many alternatives
    constraint: Constraint | None = None  # structured output: the grammar's mask on every step (hire.serve.grammar)

    @property
    def position(self) -> int:
        """Position of the last generated token (the next step's input)."""
        return self.prompt.numel() + len(self.tokens) - 1


@dataclass
class LoopStats:
    steps: int = 0
    step_tokens: int = 0  # sum of batch sizes
    decode_s: float = 0.0
    prefills: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    finished: int = 0
    cancelled: int = 0

    def summary(self) -> dict:
        return {"steps": self.steps, "mean_batch": self.step_tokens / self.steps if self.steps else 0.0,
                "decode_tokens_per_s": self.step_tokens / self.decode_s if self.decode_s else 0.0,
                "prefills": self.prefills, "prefill_tokens": self.prefill_tokens,
                "prefill_ms_mean": 1000 * self.prefill_s / self.prefills if self.prefills else 0.0,
                "finished": self.finished, "cancelled": self.cancelled}


class Scheduler:
    """Runs ``decoder``: ``run`` the loop in this thread (or ``start`` it on its own), ``submit`` a
    Sequence, ``cancel`` it, ``stop`` the loop.

    ``hire serve`` runs the loop in the main thread: a decode step (dozens of OpenMP parallel
    regions) run from a second thread took 3.4-4.3x as long here (SmolLM2 12.5 ms against 2.9;
    benchmarks/batch_step.py --parts thread)."""

    def __init__(self, decoder: BatchDecoder, *, hire: bool, max_waiting: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, max_stall: float = MAX_STALL):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        if max_stall < 0:
            raise ValueError(f"max_stall must be >= 0 (0: chunks of prefill_chunk tokens), got {max_stall}")
        self.max_stall = max_stall
        self.step_s: dict[int, float] = {}  # a decode step's time by its batch size (EMAs)
        self.token_s: float | None = None  # what a prompt token adds to a step (EMA)
        self.decoder = decoder
        self.hire = hire
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting  # requests that may wait for a slot (None: any number)
        self.pending: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.stats = LoopStats()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running = False
        self.error: BaseException | None = None  # what ended the loop, if it failed
        self._calls: deque[Callable[[], None]] = deque()  # run by the loop before its next step (between_steps)

    # --- the other threads' side -------------------------------------------------------------
    def start(self) -> None:
        """The loop on a thread of its own (tests, an app run in process)."""
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self.run, name="hire-decode", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._stopping or not self._running:
                raise SchedulerStopped("the server is shutting down" if self._stopping else
                                       f"the decode loop has stopped ({self.error!r})")
            free = self.decoder.slots - len(self.active)  # the loop admits that many of the pending at its next turn
            if self.max_waiting is not None and len(self.pending) - free >= self.max_waiting:
                raise QueueFull(f"all {self.decoder.slots} slots are busy and {len(self.pending) - free} requests are "
                                f"waiting (--max-waiting {self.max_waiting}); retry later")
            self.pending.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Drop ``seq`` before its next step (its slot is freed); no-op once it has finished."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is still running or waiting, end the loop and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def between_steps(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread before its next step, or at once where it waits for work
        (hire.serve.background switches the engine's head there). What ``fn`` raises is logged; the
        loop goes on."""
        with self._cond:
            self._calls.append(fn)
            self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            return {"active": len(self.active), "waiting": len(self.pending), "slots": self.decoder.slots}

    # --- the loop's thread (the main one under ``hire serve``) ----------------------------------
    def run(self) -> None:
        """The decode loop, until ``stop`` (or a failure, kept in ``error``)."""
        with self._cond:
            if self._stopping:
                return
            self._running = True
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self.pending or self.active or self._calls):
                        self._cond.wait()
                    if self._stopping:
                        break
                    calls, self._calls = list(self._calls), deque()
                    admit = []
                    while self.pending and len(self.active) + len(admit) < self.decoder.slots:
                        admit.append(self.pending.popleft())
                for fn in calls:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - e.g. a head switch that failed: serve on as before
                        log.exception("hire serve: a call between decode steps failed")
                for seq in admit:
                    self._admit(seq)
                for seq in [s for s in self.active if s.cancelled]:
                    self._finish(seq, "cancelled")
                prefilling = next((s for s in self.active if s.prefilled < s.prompt.numel()), None)
                decoding = sum(1 for s in self.active if s.tokens)  # sequences past their prefill
                if prefilling is not None and decoding and self.decoder.can_fuse_prefill(self.hire):
                    self._step(prefilling)  # the chunk rides in the decode step: weights read once
                    continue
                if prefilling is not None:  # one chunk of the earliest admitted prompt still in prefill
                    rest = prefilling.prompt.numel() - prefilling.prefilled
                    self._prefill_chunk(prefilling, self.chunk_size(decoding, remaining=rest), measure=decoding)
                if any(s.tokens for s in self.active):
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear why
            self.error = exc
            for seq in list(self.active):
                self._finish(seq, "error", f"the decode loop failed: {exc!r}")
        finally:
            with self._cond:
                self._stopping = True
                self._running = False
                waiting, self.pending = list(self.pending), deque()
            for seq in list(self.active) + waiting:
                self._finish(seq, "cancelled", "the server is shutting down")

    def _admit(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        if seq.generator is None:
            seed = seq.sampling.seed if seq.sampling.seed is not None else int(torch.seed())
            seq.generator = torch.Generator().manual_seed(seed)
        seq.slot = self.decoder.acquire()
        self.active.append(seq)  # its prompt is prefilled a chunk per loop turn (_prefill_chunk)

    def chunk_size(self, decoding: int, fused: bool = False, remaining: int | None = None) -> int:
        """Prompt tokens to prefill before (or, ``fused``, within) the next decode step: ``prefill_chunk``
        when nothing is decoding (nobody waits) or ``max_stall`` is 0; else as many as take ``max_stall``
        decode steps, by the measured times (``MIN_CHUNK`` until both are measured), or the prompt's
        ``remaining`` tokens whole where they fit in ``WHOLE_WITHIN`` such chunks. ``decoding``: how many
        sequences the step decodes (its time is measured by batch size). A chunk on its own
        has at least ``MIN_CHUNK`` tokens; one fused into the decode step (whose rows fill the vector
        lanes with it) at least 1; none more than ``prefill_chunk``."""
        if not decoding or self.max_stall == 0:
            return self.prefill_chunk
        floor = min(1 if fused else MIN_CHUNK, self.prefill_chunk)
        step = self.step_s.get(decoding)
        if step is None or self.token_s is None:
            fit = min(MIN_CHUNK, self.prefill_chunk)
        else:
            fit = max(floor, min(self.prefill_chunk, int(self.max_stall * step / self.token_s)))
        if remaining is not None and remaining <= WHOLE_WITHIN * fit:
            return min(remaining, self.prefill_chunk)
        return fit

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else (1 - EMA) * old + EMA * new

    def _prefill_chunk(self, seq: Sequence, size: int, measure: bool = True) -> None:
        """The next ``size`` tokens of ``seq``'s prompt into its slot; after the last, its first token.
        ``measure``: this chunk's time per token is what ``chunk_size`` sizes the next chunks by."""
        start = seq.prefilled
        part = seq.prompt[start : start + size]
        t = time.perf_counter()
        try:
            hidden = self.decoder.prefill(seq.slot, part, start)
        except ValueError as exc:
            self._finish(seq, "error", str(exc))
            return
        seq.prefilled += part.numel()
        took = time.perf_counter() - t
        if measure:
            self.token_s = self._ema(self.token_s, took / part.numel())
        self.stats.prefill_s += took
        self._chunk_done(seq, part.numel(), hidden)

    def _chunk_done(self, seq: Sequence, tokens: int, hidden: torch.Tensor) -> None:
        """``tokens`` more of ``seq``'s prompt are in its slot; after the last chunk, its first token from
        ``hidden`` (the prompt's last position).  # hidden: (1, D)"""
        self.stats.prefill_tokens += tokens
        if seq.prefilled == seq.prompt.numel():
            self.stats.prefills += 1
            self._sample_and_deliver([seq], hidden)

    def _step(self, prefilling: Sequence | None = None) -> None:
        """A decode step of the sequences past their prefill; with ``prefilling``, the next chunk of its
        prompt in the same native call (``chunk_size`` tokens: its time past a plain step's is what sizes
        the next chunks)."""
        batch = [s for s in self.active if s.tokens]  # the sequences past their prefill
        t = time.perf_counter()
        tokens = torch.tensor([s.tokens[-1] for s in batch])
        positions, slots = [s.position for s in batch], [s.slot for s in batch]
        last = part = None
        if prefilling is None:
            hidden = self.decoder.step(tokens, positions, slots, self.hire)
        else:
            start = prefilling.prefilled
            rest = prefilling.prompt.numel() - start
            part = prefilling.prompt[start : start + self.chunk_size(len(batch), fused=True, remaining=rest)]
            try:
                hidden, last = self.decoder.step_with_prefill(tokens, positions, slots, self.hire, part,
                                                              prefilling.slot, start)
            except ValueError as exc:  # the prompt does not fit: that request fails, the others step next turn
                self._finish(prefilling, "error", str(exc))
                return
            prefilling.prefilled += part.numel()
        self._sample_and_deliver(batch, hidden)
        took = time.perf_counter() - t
        plain = self.step_s.get(len(batch))
        if part is None:
            self.step_s[len(batch)] = self._ema(plain, took)
            self.stats.decode_s += took
        else:  # what the chunk added to a step of this many sequences is its cost
            extra = max(took - (plain if plain is not None else took), 0.0)
            if plain is not None:
                self.token_s = self._ema(self.token_s, max(extra, 1e-6) / part.numel())
            self.stats.decode_s += took - extra
            self.stats.prefill_s += extra
            self._chunk_done(prefilling, part.numel(), last)
        self.stats.steps += 1
        self.stats.step_tokens += len(batch)

    def _sample_and_deliver(self, batch: list[Sequence], hidden: torch.Tensor) -> None:
        # hidden: (B, D) -> one token per sequence
        allowed, failed = {}, set()
        for j, seq in enumerate(batch):
            if seq.constraint is not None:
                try:
                    allowed[j] = seq.constraint.allowed()
                except GrammarError as exc:  # this request fails; the loop and the others go on
                    failed.add(j)
                    self._finish(seq, "error", str(exc))
        # a grammar that allows few tokens: their exact rows, and no head candidates for that row
        few = {j for j, mask in allowed.items() if batch[j].logprobs is None and int(mask.sum()) <= FEW_ROWS}
        rest = [j for j in range(len(batch)) if j not in few and j not in failed]
        rows = hidden if len(rest) == len(batch) else hidden[rest]  # no copy when every row takes the head's
        logits, idx = self.decoder.logits(rows, self.hire) if rest else (None, None)
        at = {j: r for r, j in enumerate(rest)}
        for j, seq in enumerate(batch):
            s = seq.sampling
            if j in failed:
                continue
            if j in allowed:
                try:
                    token, row_logits, row_idx = self._constrained(seq, hidden[j : j + 1], allowed[j], j in few,
                                                                   logits, idx, at.get(j))
                    self._deliver(seq, token, hidden[j : j + 1], row_logits, row_idx)
                except (GrammarError, GrammarFailed) as exc:
                    self._finish(seq, "error", str(exc))
                continue
            row_logits, row_idx = logits[at[j] : at[j] + 1], None if idx is None else idx[at[j] : at[j] + 1]
            stats = self.decoder.sampling_stats
            tail_step = needs_tail(row_idx, s.temperature, s.top_k) and self.decoder.engine.sample_tail
            if tail_step and seq.policy.dense_now():  # decided from this sequence's past steps only
                stats.skipped += 1
                row_logits, row_idx = self.decoder.dense_logits(hidden[j : j + 1]), None
                token = int(sample(row_logits, None, s.temperature, None, s.top_p, seq.generator))
            else:
                tail = self.decoder.tail(hidden[j : j + 1], row_logits, row_idx) if tail_step else None
                seq.policy.mark(stats)
                token = int(sample(row_logits, row_idx, s.temperature, s.top_k, s.top_p, seq.generator, tail, stats))
                if tail is not None:
                    seq.policy.probed(stats, self.decoder.vocab_size)
            self._deliver(seq, token, hidden[j : j + 1], row_logits, row_idx)

    def _constrained(self, seq: Sequence, hidden: torch.Tensor, mask: torch.Tensor, few: bool,
                     logits: torch.Tensor | None, idx: torch.Tensor | None, r: int | None):
        """The next token of a sequence under a grammar (``mask``: the tokens it allows): over exactly
        the allowed rows when they are ``few`` or when none of the head's candidates is allowed, else
        over the allowed candidates (the rows past them are not sampled: the grammar's choice among
        the head's best). Returns the token and the unmasked logits it came from, for logprobs.
        # hidden: (1, D), mask: (V,) bool"""
        s = seq.sampling
        if not few:
            row_logits, row_idx = logits[r : r + 1], None if idx is None else idx[r : r + 1]
            keep = mask[None] if row_idx is None else mask[row_idx[0]][None]
            if bool(keep.any()):
                token = int(sample(row_logits.masked_fill(~keep, float("-inf")), row_idx, s.temperature, s.top_k,
                                   s.top_p, seq.generator))
                return token, row_logits, row_idx
        rows = mask.nonzero()[:, 0]
        if rows.numel() == 0:
            raise GrammarFailed(f"the grammar allows no token after {len(seq.tokens)} generated")
        row_logits = self.decoder.rows(hidden, rows)
        token = int(sample(row_logits, rows[None], s.temperature, s.top_k, s.top_p, seq.generator))
        return token, row_logits, rows[None]

    def _deliver(self, seq: Sequence, token: int, hidden: torch.Tensor, row_logits: torch.Tensor,
                 row_idx: torch.Tensor | None) -> None:
        """``token`` to ``seq``: its grammar advanced, then emitted (with its logprobs) unless it ends the
        sequence; the sequence finished at a stop token, a complete structured value, or its length."""
        seq.tokens.append(token)
        if seq.constraint is not None and token not in seq.stop_ids:
            seq.constraint.advance(token)
        if token in seq.stop_ids:
            self._finish(seq, "stop")
            return
        if seq.logprobs is None:
            seq.emit(("token", token))
        else:
            seq.emit(("token", token, self.decoder.token_logprobs(hidden, row_logits, row_idx, token, seq.logprobs)))
        if seq.constraint is not None and seq.constraint.done:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.max_tokens or seq.position + 1 >= self.decoder.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, message: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self.active:
            self.active.remove(seq)
            self.decoder.release(seq.slot)
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        seq.emit(("end", reason, message))
