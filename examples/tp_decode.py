"""Tensor-parallel HiRE decoding from Python, one process per rank:

    torchrun --nproc_per_node=2 examples/tp_decode.py "To be, or not to be"

Every rank loads the model, keeps its share of the attention heads, FFN neurons and vocabulary,
and decodes the same tokens; rank 0 prints them for each selection mode."""

import sys

import torch

from hire.calibrate.prepare import prepare_model
from hire.distributed import TPEngine, main_rank_first, tp_group
from hire.recommended import recommended_config

with tp_group(2) as comm:  # checks that torchrun started 2 processes; left safely however the block ends
    torch.set_num_threads(1)
    config = recommended_config("smollm2-135m")
    with main_rank_first(comm):  # rank 0 fills the caches (converted model, fitted head proxy), then the rest read them
        model, tokenizer, head_proxy = prepare_model("smollm2-135m", config, progress=False)
    engine = TPEngine(model, config, comm, head_proxy=head_proxy, max_seq_len=256)
    prompt = tokenizer(sys.argv[1] if len(sys.argv) > 1 else "To be, or not to be", return_tensors="pt").input_ids[0]
    for mode in ("dense", "exact", "da"):
        engine.set_mode(mode)
        stats = engine.generate(prompt, 24, hire=mode != "dense")
        if comm.is_main:
            print(f"{mode:5s} {stats.tokens_per_s:5.1f} tok/s  {tokenizer.decode(stats.token_ids)!r}")
