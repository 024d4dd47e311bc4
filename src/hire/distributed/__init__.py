"""Tensor parallelism and DA-TOP-k on torch.distributed (gloo, as the engine decodes on the CPU), launched by
torchrun: ``torchrun --nproc_per_node=P -m hire bench --tp P`` (``hire bench --tp P`` launches it)."""

from hire.distributed.comm import Comm, init_tp, launch, launched_by_torchrun, main_rank_first, tp_group
from hire.distributed.topk import global_topk, shard_range, split_count
from hire.distributed.tp import MODES, TPEngine, check_tp, head_split

__all__ = ["MODES", "Comm", "TPEngine", "check_tp", "global_topk", "head_split", "init_tp", "launch",
           "launched_by_torchrun", "main_rank_first", "shard_range", "split_count", "tp_group"]
