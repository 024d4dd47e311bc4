import json
import os
import stat
import statistics

import pytest
import torch

from hire.bench import run_bench
from hire.bench.llama_cpp import (
    ENV_VAR,
    LlamaBenchRound,
    LlamaCppError,
    cache_location,
    find_tools,
    llama_bench_command,
    parse_llama_bench,
    run_llama_bench,
)
from hire.cli import main
from hire.commands.bench import format_bench
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.plots import plot_bench
from tiny_models import make

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 11])

# llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 512 -n 64 -r 1 -o json, recorded (llama.cpp 0c1e570
# from the llama-cpp-python 0.3.36 sdist) on 2 cores shared with other work, hence the low figures;
# trimmed to the fields read
RECORDED = [
    {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor", "backends": "CPU",
     "model_type": "llama 256M Q4_1", "model_size": 96576768, "model_n_params": 134515008, "n_threads": 2,
     "n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ns": 12000126329, "stddev_ns": 0, "avg_ts": 42.666218,
     "stddev_ts": 0.0, "samples_ns": [12000126329], "samples_ts": [42.6662]},
    {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor", "backends": "CPU",
     "model_type": "llama 256M Q4_1", "model_size": 96576768, "model_n_params": 134515008, "n_threads": 2,
     "n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ns": 26416284540, "stddev_ns": 0, "avg_ts": 2.422748,
     "stddev_ts": 0.0, "samples_ns": [26416284540], "samples_ts": [2.42275]},
]
TG, PP = 2.422748, 42.666218


def _engine():
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=64, proxy="int8", group_size=1024), ffn=FFNConfig(density=0.5))
    return Engine(make("llama"), cfg, dtype=torch.bfloat16, max_seq_len=64)


def _script(path, body: str):
    """An executable shell script at ``path`` (a stand-in for a llama-bench binary)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_llama_bench(tmp_path, output: str | None = None):
    """A llama-bench that records its arguments and prints ``output`` (default: RECORDED)."""
    (tmp_path / "out.json").write_text(json.dumps(RECORDED) if output is None else output)
    return _script(tmp_path / "llama-bench", f'echo "$@" >> "{tmp_path}/args"\ncat "{tmp_path}/out.json"\n')


def test_bench_figures_are_consistent_with_each_other(tmp_path):
    engine = _engine()
    r = run_bench(engine, PROMPT, tokens=6, rounds=3, progress=False, prefill_tokens=20)
    dense, hire = r["tokens_per_s_dense_rounds"], r["tokens_per_s_hire_rounds"]
    assert len(dense) == len(hire) == len(r["prefill_tokens_per_s_rounds"]) == 3
    assert all(v > 0 for v in dense + hire + r["prefill_tokens_per_s_rounds"])
    assert r["tokens_per_s_dense"] == statistics.median(dense) and r["tokens_per_s_hire"] == statistics.median(hire)
    assert r["speedup"] == pytest.approx(statistics.median(hire) / statistics.median(dense))
    assert r["ms_per_token_dense"] == pytest.approx(1000 / r["tokens_per_s_dense"])
    assert r["ms_per_token_hire"] == pytest.approx(1000 / r["tokens_per_s_hire"])
    assert 0 < r["bytes_per_token_hire"] < r["bytes_per_token_dense"]  # the head reads candidates, the FFN half
    assert r["ideal_speedup"] == pytest.approx(r["bytes_per_token_dense"] / r["bytes_per_token_hire"])
    assert r["bandwidth_gb_s_hire"] == pytest.approx(r["bytes_per_token_hire"] * r["tokens_per_s_hire"] / 1e9)
    assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert r["bytes_dense"]["total"] == r["bytes_per_token_dense"]
    assert r["prefill_tokens"] == 20 and r["prefill_tokens_per_s"] == statistics.median(r["prefill_tokens_per_s_rounds"])
    assert 0 <= r["greedy_agreement_last_round"] <= 1
    assert set(r["ms_per_part_dense"]) == {"head", "ffn", "attention", "other"}
    assert all(v >= 0 for v in r["ms_per_part_hire"].values())
    assert "llama_cpp" not in r
    r["model"] = "tiny"
    plot_bench(r, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prefill_longer_than_the_engine_is_refused():
    with pytest.raises(ValueError, match=r"prefill_tokens must be in 1\.\.63"):
        run_bench(_engine(), PROMPT, tokens=4, rounds=1, progress=False, breakdown=False, prefill_tokens=64)


def test_llama_bench_figures_and_ratios_come_through_every_round(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(_fake_llama_bench(tmp_path)))
    gguf = tmp_path / "m.gguf"
    anchor = LlamaBenchRound(find_tools(build=False), gguf, threads=2, n_prompt=20, n_gen=6)
    r = run_bench(_engine(), PROMPT, tokens=6, rounds=3, progress=False, breakdown=False, prefill_tokens=20,
                  anchor=anchor)
    lc = r["llama_cpp"]
    calls = (tmp_path / "args").read_text().splitlines()
    assert calls == [f"-m {gguf} -t 2 -p 20 -n 6 -r 1 -o json"] * 3  # one run per round, our threads and lengths
    assert lc["command"] == llama_bench_command(anchor.tools, gguf, threads=2, n_prompt=20, n_gen=6, repetitions=1)
    assert lc["tg_tokens_per_s_rounds"] == [TG] * 3 and lc["pp_tokens_per_s_rounds"] == [PP] * 3
    assert lc["tg_tokens"] == 64 and lc["pp_tokens"] == 512  # as the (recorded) output says, not as asked
    assert lc["hire_vs_llama_cpp"] == pytest.approx(r["tokens_per_s_hire"] / TG)
    assert lc["dense_vs_llama_cpp"] == pytest.approx(r["tokens_per_s_dense"] / TG)
    assert lc["hire_vs_llama_cpp_rounds"] == pytest.approx([h / TG for h in r["tokens_per_s_hire_rounds"]])
    assert lc["prefill_vs_llama_cpp"] == pytest.approx(r["prefill_tokens_per_s"] / PP)
    assert lc["build"]["build_commit"] == "0c1e570" and lc["build"]["source"].startswith(f"${ENV_VAR}")
    r["model"] = "tiny"
    text = format_bench(r)
    hire_line = next(line for line in text.splitlines() if line.startswith("HiRE / llama.cpp"))
    assert hire_line.split()[3] == f"{lc['hire_vs_llama_cpp']:.2f}x"
    assert "tg64 tokens/s" in text and "pp512 tokens/s" in text and " ".join(lc["command"]) in text


def test_parse_llama_bench_reads_tg_and_pp():
    out = parse_llama_bench(json.dumps(RECORDED))
    assert out["tg"]["tokens_per_s"] == TG and out["tg"]["tokens"] == 64
    assert out["pp"]["tokens_per_s"] == PP and out["pp"]["tokens"] == 512
    assert out["build_commit"] == "0c1e570" and out["n_threads"] == 2
    tg_only = parse_llama_bench(json.dumps(RECORDED[1:]))
    assert "pp" not in tg_only and tg_only["tg"]["samples_tokens_per_s"] == [2.42275]


@pytest.mark.parametrize("text, message", [
    ("| model | size |\n| llama | 92 MiB |", "did not print llama-bench JSON"),
    ('{"avg_ts": 3}', "not a list of llama-bench tests"),
    ("[]", "not a list of llama-bench tests"),
    ('[{"n_prompt": 0, "n_gen": 64}]', "lacks avg_ts, stddev_ts"),
    ('[{"n_prompt": 0, "n_gen": 64, "avg_ts": 0, "stddev_ts": 0}]', "reported 0 tokens/s for tg64"),
    ('[{"n_prompt": 8, "n_gen": 8, "avg_ts": 5, "stddev_ts": 0}]', "has no pp or tg test"),
])
def test_output_that_is_not_llama_bench_json_is_a_clear_error(text, message):
    with pytest.raises(LlamaCppError, match=message):
        parse_llama_bench(text, "fake-bench")


def test_a_failing_or_garbage_llama_bench_is_a_clear_error(tmp_path, monkeypatch):
    failing = _script(tmp_path / "failing", 'echo "error: failed to load model" >&2\nexit 3\n')
    monkeypatch.setenv(ENV_VAR, str(failing))
    with pytest.raises(LlamaCppError, match=r"failing failed on m\.gguf \(exit 3\):\nerror: failed to load model"):
        run_llama_bench(find_tools(build=False), "m.gguf", threads=1, n_prompt=0, n_gen=4)
    garbage = _fake_llama_bench(tmp_path, "Segmentation fault? no: just text")
    with pytest.raises(LlamaCppError, match=r"llama-bench did not print llama-bench JSON"):
        run_llama_bench(find_tools(garbage, build=False), "m.gguf", threads=1, n_prompt=0, n_gen=4)
    not_a_binary = tmp_path / "not-a-binary"
    not_a_binary.write_bytes(b"\x7fELF garbage")
    not_a_binary.chmod(0o755)
    with pytest.raises(LlamaCppError, match=r"could not run .*not-a-binary"):
        run_llama_bench(find_tools(not_a_binary, build=False), "m.gguf", threads=1, n_prompt=0, n_gen=4)


def test_a_missing_llama_bench_names_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(LlamaCppError, match=rf"\${ENV_VAR} names .*nowhere, which does not exist"):
        find_tools(build=False)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "plain"))
    (tmp_path / "plain").write_text("")
    os.chmod(tmp_path / "plain", 0o644)
    with pytest.raises(LlamaCppError, match="not executable"):
        find_tools(build=False)
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))  # no build there, and none is made
    with pytest.raises(LlamaCppError, match=r"no llama-bench in .*cache/llama\.cpp/.*python -m hire\.bench\.llama_cpp"):
        find_tools(build=False)


def test_the_cached_build_is_found_with_its_build_record(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    home = cache_location()
    (home / "bin").mkdir(parents=True)
    bench = _script(home / "bin" / "llama-bench", "exit 0\n")
    (home / "build.json").write_text(json.dumps({"commit": "abc", "simd": ["AVX2"]}))
    tools = find_tools(build=False)
    assert tools.bench == bench and tools.quantize is None and tools.build == {"commit": "abc", "simd": ["AVX2"]}
    quantize = _script(home / "bin" / "llama-quantize", "exit 0\n")
    assert find_tools(build=False).quantize == quantize
    explicit = _fake_llama_bench(tmp_path)  # a given path wins over the cache
    assert find_tools(explicit, build=False).bench == explicit


def test_bench_cli_json(model_dir, capsys, tmp_path):  # noqa: F811
    fake = _fake_llama_bench(tmp_path)
    code = main(["bench", "--model", model_dir, "--tokens", "4", "--rounds", "2", "--no-breakdown", "--head-proxy", "int8",
                 "--head-candidates", "64", "--prefill-tokens", "16", "--vs-transformers", "--llama-bench", str(fake),
                 "--plot", str(tmp_path / "p.png"), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == model_dir and r["tokens_per_s_transformers"] > 0
    assert len(r["tokens_per_s_hire_rounds"]) == 2 and r["prefill_tokens"] == 16
    assert r["speedup"] == pytest.approx(r["tokens_per_s_hire"] / r["tokens_per_s_dense"])
    assert r["llama_cpp"] == {"available": False,  # a HF directory has no GGUF to give llama.cpp, which is not run
                              "reason": "no GGUF file for this model (llama.cpp reads GGUF only)"}
    assert not (tmp_path / "args").exists()
    assert (tmp_path / "p.png").exists()
