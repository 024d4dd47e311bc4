"""One rank of the 2-process tests in test_distributed.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py SCENARIO OUT_DIR

Each rank writes OUT_DIR/rank{r}.json with what it saw; the test compares."""

import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from hire.config import FFNConfig, HeadConfig, HiReConfig  # noqa: E402
from hire.distributed import TPEngine, global_topk, init_tp  # noqa: E402
from hire.distributed.comm import tp_group  # noqa: E402
from hire.engine import Engine  # noqa: E402
from tiny_models import make  # noqa: E402

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11, 64, 2, 33, 120])
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")  # what gloo names its worker and socket threads


def topk_cases(comm):
    """Exact global top-k over the two ranks' shards vs torch.topk over everything."""
    out = []
    gen = torch.Generator().manual_seed(1234)  # the same on both ranks: each takes its own shard
    for n_local, k, rows in [(7, 1, 1), (50, 10, 3), (64, 64, 2), (33, 50, 1), (5, 10, 2), (128, 3, 4)]:
        full = torch.randperm(rows * n_local * comm.world, generator=gen).float().view(rows, -1)  # distinct values
        mine = full[:, comm.rank * n_local : (comm.rank + 1) * n_local]
        values, idx = global_topk(mine, comm.rank * n_local, k, comm, "test")
        want = full.topk(k, dim=-1)
        out.append({"n_local": n_local, "k": k, "values_equal": torch.equal(values, want.values),
                    "idx_equal": torch.equal(idx, want.indices)})
    # explicit global indices (a rank holding scattered rows) and fewer rows than k on one rank
    full = torch.randperm(40, generator=gen).float().view(1, -1)
    rows = torch.arange(comm.rank, 40, 2) if comm.rank == 0 else torch.arange(1, 40, 2)[:3]
    values, idx = global_topk(full[:, rows], rows.view(1, -1), 12, comm, "test")
    held = torch.cat([torch.arange(0, 40, 2), torch.arange(1, 40, 2)[:3]])
    want = full[:, held].topk(12, dim=-1)
    out.append({"scattered": True, "values_equal": torch.equal(values, want.values),
                "idx_equal": torch.equal(idx, held[want.indices])})
    return out


def engine_case(comm, arch: str, heads: int, kv: int):
    model = make(arch, seed=1)
    if heads != model.config.num_attention_heads:  # an uneven head split (6 heads, 3 kv heads over 2 ranks)
        from transformers import LlamaConfig, LlamaForCausalLM

        from tiny_models import _common

        torch.manual_seed(1)
        cfg = dict(_common, hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(3.0)
    config = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8"), ffn=FFNConfig(density=0.5, oversample=1.25))
    engine = TPEngine(model, config, comm, dtype=torch.float32, max_seq_len=64)
    reference = Engine(model, None, dtype=torch.float32, max_seq_len=64)
    result = {"arch": arch, "heads": [len(h) for h in engine.heads]}
    ref = {"dense": reference.generate(PROMPT, 16, hire=False).token_ids,
           "hire": reference.generate(PROMPT, 16, hire=True).token_ids}
    for mode in ("dense", "exact", "da"):
        engine.set_mode(mode)
        before = engine.comm.snapshot()[0]
        tokens = engine.generate(PROMPT, 16, hire=mode != "dense").token_ids
        counts = engine.comm.snapshot()[0] - before
        result[mode] = {"tokens": tokens, "counts": dict(counts)}
    engine.set_mode("da")
    engine.track(True)
    engine.teacher_forced(torch.cat([PROMPT, torch.tensor(ref["hire"])]), hire=True, start=PROMPT.numel())
    result["da_recall"] = engine.recall()
    result["reference"] = ref
    # the vocabulary-parallel log-probability equals the single process's
    hidden = reference.forward(PROMPT, 0, hire=False)
    engine.forward(PROMPT, 0, hire=False)
    result["log_prob"] = [float(reference.log_prob(hidden, torch.tensor([t]))) for t in (0, 7, 300)]
    result["log_prob_tp"] = [float(engine.log_prob(hidden, torch.tensor([t]))) for t in (0, 7, 300)]
    return result


def gloo_threads() -> list[str]:
    """The gloo threads alive in this process, by name (Linux: /proc/self/task/*/comm)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return sorted(names)


LATE_IMPORTS = []  # functions of "modules" imported while the group was up: they live until the interpreter exits


def import_late():
    """What a module imported while the group is up does to it: torch.distributed.nn (transformers
    imports it while loading a model) and anything else that reads ``dist.group.WORLD`` into a
    default argument keep the live group referenced after destroy_process_group."""
    importlib.import_module("torch.distributed.nn")

    def broadcast(tensor, src, group=dist.group.WORLD):
        return tensor

    LATE_IMPORTS.append(broadcast)


def shutdown_case(rank: int, timeout_s: float) -> dict:
    """Leave the group the way a command does: imports after init, rank 1 returning early from
    the block while rank 0 still works; then count the gloo threads left behind."""
    with tp_group(2, timeout_s) as comm:
        import_late()
        comm.all_reduce(torch.ones(4), "test")
        inside = gloo_threads()  # gloo starts its worker threads with the first collective
        if rank == 1:
            return {"inside": inside}  # early return: tp_group waits for rank 0 at its barrier
        time.sleep(1.0)  # rank 0 is still busy (printing its report) when rank 1 leaves
    return {"inside": inside}


def main():
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    timeout_s = float(os.environ.get("HIRE_TEST_TIMEOUT", "60"))
    if scenario == "mismatch":
        try:
            init_tp(3)
            result = {"error": None}
        except ValueError as err:
            result = {"error": str(err)}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        return
    if scenario == "shutdown":
        result = shutdown_case(rank, timeout_s) | {"after": gloo_threads()}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        return
    with tp_group(2, timeout_s) as comm:
        torch.set_num_threads(1)
        if scenario == "topk":
            result = topk_cases(comm)
        elif scenario == "engine":
            result = [engine_case(comm, "llama", 4, 2), engine_case(comm, "gemma3_text", 4, 2),
                      engine_case(comm, "llama", 6, 3)]
        elif scenario in ("fail", "hang"):
            if rank == 1:
                if scenario == "fail":
                    raise RuntimeError("rank 1 fails on purpose")  # tp_group leaves without its barrier
                time.sleep(120)  # alive but never joins the collective
            comm.all_reduce(torch.ones(4), "test")
            result = {"finished": True}
        else:
            raise ValueError(scenario)
        (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
