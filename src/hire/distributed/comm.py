"""The tensor-parallel group: torch.distributed (gloo: the engine decodes on the CPU) under torchrun, with
every collective counted (how many, how many bytes, of which kind) and every failure turned into
an error that names the rank and the likely cause instead of a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

# torch renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

LAUNCH_HINT = "launch it with `torchrun --nproc_per_node={tp} -m hire ...` or let `hire ... --tp {tp}` launch it"


class Comm:
    """Rank ``rank`` of ``world`` tensor-parallel ranks. One rank (``world == 1``) runs every
    collective as the identity, so the same code is the single-process engine.

    ``counts`` / ``nbytes`` count collectives (none with one rank) by kind ("attention", "ffn", "ffn_select",
    "head_select", "head_topk", ...); bytes are what this rank contributes to each (its message).
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.counts: Counter = Counter()
        self.nbytes: Counter = Counter()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _failed(self, op: str, kind: str, err: Exception) -> RuntimeError:
        return RuntimeError(
            f"rank {self.rank} of {self.world}: {op} ({kind}) failed: {str(err).splitlines()[0] if str(err) else err!r}. "
            "Another rank failed (see its error above) or stopped responding within the timeout (--timeout)"
        )

    def _count(self, t: torch.Tensor, kind: str) -> None:
        if self.world > 1:  # one rank exchanges nothing
            self.counts[kind] += 1
            self.nbytes[kind] += t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place.  # t: any -> same"""
        self._count(t, kind)
        if self.world > 1:
            try:
                dist.all_reduce(t)
            except RuntimeError as err:
                raise self._failed("all_reduce", kind, err) from err
        return t

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Every rank's ``t``, stacked in rank order.  # t: (...) -> (world, ...)"""
        self._count(t, kind)
        if self.world == 1:
            return t.unsqueeze(0)
        out = t.new_empty((self.world * t.numel(),))  # gloo wants the ranks' messages concatenated
        try:
            _all_gather_single(out, t.contiguous().view(-1))
        except RuntimeError as err:
            raise self._failed("all_gather", kind, err) from err
        return out.view(self.world, *t.shape)

    def snapshot(self) -> tuple[Counter, Counter]:
        return Counter(self.counts), Counter(self.nbytes)

    def check_same(self, what: str, value: str) -> None:
        """Raise on every rank unless all ranks hold the same ``value`` (arguments, model shapes).
        Not counted: it runs once, at start."""
        if self.world == 1:
            return
        digest = torch.tensor(list(value.encode()[:4096].ljust(4096, b"\0")), dtype=torch.uint8)
        gathered = [torch.empty_like(digest) for _ in range(self.world)]
        try:
            dist.all_gather(gathered, digest)
        except RuntimeError as err:
            raise self._failed("all_gather", "start-up check", err) from err
        bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if bad:
            raise ValueError(f"ranks {bad} have a different {what} from rank 0: every rank must run the same command")

    def barrier(self, timeout_s: float) -> None:
        """Wait for every rank (gloo names the ranks that did not arrive)."""
        if self.world > 1:
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            except RuntimeError as err:
                raise self._failed("barrier", "start-up", err) from err

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def main_rank_first(comm: Comm, timeout_s: float = 3600.0):
    """Rank 0 runs the block first (it fills the caches: the converted model, the fitted head
    proxy), then the other ranks run it and read them."""
    if not comm.is_main:
        comm.barrier(timeout_s)
    yield
    if comm.is_main:
        comm.barrier(timeout_s)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_tp(tp: int, timeout_s: float = 300.0) -> Comm:
    """Join the tensor-parallel group of ``tp`` ranks that torchrun started (gloo). ``tp == 1``
    outside torchrun is the single process. Checks the world size first."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if not launched_by_torchrun():
        if tp == 1:
            return Comm()
        raise ValueError(f"--tp {tp} needs {tp} processes: " + LAUNCH_HINT.format(tp=tp))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != tp:
        raise ValueError(
            f"this run has {world} processes (WORLD_SIZE={world}) but --tp {tp}: launch "
            f"`torchrun --nproc_per_node={tp}` or pass --tp {world}"
        )
    if world == 1:
        return Comm()
    # the engine decodes on the CPU, so its tensors travel over gloo (NCCL wants them on the GPU)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return Comm(rank, world)


def launch(argv: list[str], tp: int, threads: int | None = None) -> int:
    """Run ``hire argv`` on ``tp`` processes with torchrun (torch.distributed.run) on this machine;
    returns its exit status. When a rank fails torchrun stops the others and prints which rank
    failed and why. Each rank gets ``threads`` torch threads (default: cores // tp)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = threads or max(1, cores // tp)
    env = dict(os.environ, OMP_NUM_THREADS=str(per_rank), HIRE_TP_THREADS=str(per_rank))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "--monitor-interval=0.5", "-m", "hire", *argv]
    return subprocess.call(cmd, env=env)
