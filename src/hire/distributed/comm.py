"""The tensor-parallel group: torch.distributed (gloo: the engine decodes on the CPU) under torchrun, with
every collective counted (how many, how many bytes, of which kind) and every failure turned into
an error that names the rank and the likely cause instead of a hang.

Commands hold the group with ``tp_group``, which joins it and, on every way out of the block, leaves
it in a safe order (see ``tp_group`` and ``_destroy_group`` for why the order matters)."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import subprocess
import sys
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from hire.errors import HireError
from hire.system import available_cores

# torch renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

LAUNCH_HINT = "launch it with `torchrun --nproc_per_node={tp} -m hire ...` or let `hire ... --tp {tp}` launch it"

log = logging.getLogger(__name__)


class CommError(HireError, RuntimeError):
    """A collective failed on this rank: another rank failed or stopped responding within the timeout."""


class TPSetupError(HireError, ValueError):
    """The ranks do not form the group the command asked for (world size, --tp, command line)."""


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

    def _failed(self, op: str, kind: str, err: Exception) -> CommError:
        return CommError(
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
            raise TPSetupError(f"ranks {bad} have a different {what} from rank 0: every rank must run the same command")

    def barrier(self, timeout_s: float, kind: str = "start-up") -> None:
        """Wait for every rank (gloo names the ranks that did not arrive)."""
        if self.world > 1:
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            except RuntimeError as err:
                raise self._failed("barrier", kind, err) from err

    def close(self, barrier_timeout_s: float | None = None) -> None:
        """Leave the group: first wait up to ``barrier_timeout_s`` for every rank to get here (None: do
        not wait, the way out after an error), then destroy it, whether or not the barrier failed."""
        if self.world == 1 or not dist.is_initialized():
            return
        try:
            if barrier_timeout_s is not None:
                self.barrier(barrier_timeout_s, "shutdown")
        finally:
            _destroy_group()


def _destroy_group() -> None:
    """destroy_process_group, and make sure the gloo process group is really gone when it returns.

    destroy_process_group only drops torch's own references to the group. Code that read
    ``dist.group.WORLD`` into a default argument while the group was up keeps it alive:
    ``torch.distributed.nn.functional`` does (``def broadcast(tensor, src, group=group.WORLD)``), and
    transformers imports it while it loads a model, after ``init_tp``. The group then outlives the
    command with its gloo threads, and is freed only while the interpreter shuts down. A gloo
    worker that still holds the last collective's tensors then needs the GIL to release them;
    Python ends such a thread with pthread_exit, whose unwinding through gloo's noexcept code
    calls std::terminate: "terminate called without an active exception", SIGABRT, on whichever
    rank's worker was slowest (most often under CPU load). Freed here instead, the group joins its
    threads while Python is alive. ``init_tp`` imports torch.distributed.nn before the group
    exists, so its defaults hold None; the scan below covers any other late importer.
    """
    group = dist.group.WORLD
    dist.destroy_process_group()
    only_here = _refcount_of_a_local()
    if sys.getrefcount(group) > only_here:
        _drop_captured_defaults(group)
    if sys.getrefcount(group) > only_here:
        log.warning("the process group is still referenced after destroy_process_group: its gloo threads "
                    "outlive it and may abort the process at exit")
    del group  # the last reference: ~ProcessGroupGloo joins its threads now (torch releases the GIL for it)


def _refcount_of_a_local() -> int:
    """What sys.getrefcount says of an object held by one local variable only (CPython versions
    count the call's own reference differently)."""
    sole = object()
    return sys.getrefcount(sole)


def _drop_captured_defaults(group) -> None:
    """Replace ``group`` by None (torch's "the default group") in every function's default arguments."""
    for fn in gc.get_objects():
        if type(fn) is not types.FunctionType:  # not isinstance: some of torch's objects warn when asked their class
            continue
        if fn.__defaults__ and any(d is group for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if d is group else d for d in fn.__defaults__)
        if fn.__kwdefaults__ and any(d is group for d in fn.__kwdefaults__.values()):
            fn.__kwdefaults__ = {k: None if d is group else d for k, d in fn.__kwdefaults__.items()}


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
    outside torchrun is the single process. Checks the world size first. Prefer ``tp_group``,
    which also leaves the group safely."""
    if tp < 1:
        raise TPSetupError(f"--tp must be >= 1, got {tp}")
    if not launched_by_torchrun():
        if tp == 1:
            return Comm()
        raise TPSetupError(f"--tp {tp} needs {tp} processes: " + LAUNCH_HINT.format(tp=tp))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != tp:
        raise TPSetupError(
            f"this run has {world} processes (WORLD_SIZE={world}) but --tp {tp}: launch "
            f"`torchrun --nproc_per_node={tp}` or pass --tp {world}"
        )
    if world == 1:
        return Comm()
    # imported while no group exists, its `group=group.WORLD` defaults hold None, not the group
    # (imported later, by transformers, they would keep the group alive: see _destroy_group)
    importlib.import_module("torch.distributed.nn")

    # the engine decodes on the CPU, so its tensors travel over gloo (NCCL wants them on the GPU)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return Comm(rank, world)


@contextmanager
def tp_group(tp: int, timeout_s: float = 300.0) -> Iterator[Comm]:
    """The tensor-parallel group of ``tp`` ranks (``init_tp``) for the ``with`` block, left in a
    safe order on every way out of it:

    * the block ends, or returns early on some ranks: wait for every rank at a barrier (up to
      ``timeout_s``; gloo names a rank that never arrives), then destroy the group. No rank tears
      its sockets down while another still talks to it, and every rank exits after the others'
      last collective;
    * the block raises: destroy the group without the barrier (the other ranks may be inside a
      different collective: they fail fast on the closed connection, and torchrun stops them)
      and let the error through.

    Destroying frees the group and joins its gloo threads before Python shuts down (see
    ``_destroy_group``). One rank (``tp == 1``) has no group and nothing to leave.
    """
    comm = init_tp(tp, timeout_s)
    finished = False
    try:
        yield comm
        finished = True
    finally:
        comm.close(timeout_s if finished else None)


def launch(argv: list[str], tp: int, threads: int | None = None) -> int:
    """Run ``hire argv`` on ``tp`` processes with torchrun (torch.distributed.run) on this machine;
    returns its exit status. When a rank fails torchrun stops the others and prints which rank
    failed and why. Each rank gets ``threads`` torch threads (default: cores // tp)."""
    cores = available_cores()
    per_rank = threads or max(1, cores // tp)
    env = dict(os.environ, OMP_NUM_THREADS=str(per_rank), HIRE_TP_THREADS=str(per_rank))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "--monitor-interval=0.5", "-m", "hire", *argv]
    return subprocess.call(cmd, env=env)
