import json

import torch

from hire.bench import run_bench
from hire.plots import plot_bench
from hire.cli import main
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from tiny_models import make

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11])


def test_bench_runs_on_a_tiny_model_and_plots(tmp_path):
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8", group_size=1024), ffn=FFNConfig(density=0.5))
    engine = Engine(make("llama"), cfg, dtype=torch.bfloat16, max_seq_len=64)
    r = run_bench(engine, PROMPT, tokens=6, rounds=2, progress=False)
    for key in ("tokens_per_s_dense", "tokens_per_s_hire", "speedup", "ideal_speedup", "bytes_per_token_dense",
                "bytes_per_token_hire", "fraction_of_ideal", "bandwidth_gb_s_dense", "ms_per_part_hire", "overhead_hire"):
        assert key in r, key
    assert len(r["tokens_per_s_dense_rounds"]) == len(r["tokens_per_s_hire_rounds"]) == 2
    assert r["speedup"] == r["tokens_per_s_hire"] / r["tokens_per_s_dense"]
    assert set(r["ms_per_part_dense"]) == {"head", "ffn", "attention", "other"}
    assert r["bytes_per_token_hire"] < r["bytes_per_token_dense"]
    r["model"] = "tiny"
    plot_bench(r, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_json(model_dir, capsys, tmp_path):  # noqa: F811
    code = main(["bench", "--model", model_dir, "--tokens", "4", "--rounds", "1", "--no-breakdown", "--head-proxy", "int8",
                 "--head-candidates", "64", "--vs-transformers", "--llama-cpp", "--plot", str(tmp_path / "p.png"), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("model", "tokens_per_s_dense", "tokens_per_s_hire", "speedup", "ideal_speedup", "bytes_per_token_dense",
                "bytes_per_token_hire", "tokens_per_s_transformers"):
        assert key in r, key
    assert r["llama_cpp"]["available"] is False  # a HF directory has no GGUF to give llama.cpp
    assert (tmp_path / "p.png").exists()
