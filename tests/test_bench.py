import json
import os
import stat
import statistics

import pytest
import torch

from hire.bench import run_bench
from hire.bench.decode import file_report, kv_cache_bytes_per_token
import hire.bench.llama_cpp as llama_cpp
from hire.bench.llama_cpp import (
    ENV_VAR,
    NATIVE,
    WITH_AMX,
    WITHOUT_AMX,
    LlamaBenchRounds,
    LlamaCppError,
    LlamaCppTools,
    cache_location,
    cmake_options,
    cpu_has_amx,
    find_tools,
    find_variants,
    llama_bench_command,
    parse_llama_bench,
    run_llama_bench,
)
from hire.cli import main
from hire.commands.bench import format_bench
from hire.system import cpu_flags
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


def _variant_bench(tmp_path, name: str, tg: float, pp: float | None):
    """A llama-bench build ``name`` that logs "name args" to tmp_path/args and prints one test's JSON:
    tg (``-p 0``) at ``tg`` tokens/s, pp at ``pp`` or, when None, dies of SIGSEGV as ggml's AMX matmul does."""
    def one(n_prompt, n_gen, ts):
        return json.dumps([{"build_commit": f"c-{name}", "n_prompt": n_prompt, "n_gen": n_gen, "avg_ts": ts,
                            "stddev_ts": 0.0}])
    crash = 'echo "SIGSEGV in ggml_backend_amx_mul_mat" >&2; kill -SEGV $$'
    on_pp = crash if pp is None else f"echo '{one(512, 0, pp)}'"
    (tmp_path / name).mkdir()
    bench = _script(tmp_path / name / "llama-bench",
                    f'echo "{name} $*" >> "{tmp_path}/args"\n'
                    f'case "$*" in *"-p 0 "*) echo \'{one(0, 64, tg)}\' ;; *) {on_pp} ;; esac\n')
    return LlamaCppTools(bench, None, {"source": f"fake {name}", "simd": ["AVX2"]}, name)


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


def test_the_kv_cache_read_per_token_stops_at_a_sliding_window():
    engine = _engine()
    layers, kv_heads, _, head_dim = engine.k_cache.shape
    per_layer_position = 2 * kv_heads * head_dim * engine.k_cache.element_size()
    assert kv_cache_bytes_per_token(engine, 10, 4) == pytest.approx(12.5 * layers * per_layer_position)
    engine.layers[0].sliding = 8  # one layer reads 8 positions at most, the others 11..14
    assert kv_cache_bytes_per_token(engine, 10, 4) == pytest.approx((8 + 12.5 * (layers - 1)) * per_layer_position)


def test_a_prefill_longer_than_the_engine_is_refused():
    with pytest.raises(ValueError, match=r"prefill_tokens must be in 1\.\.63"):
        run_bench(_engine(), PROMPT, tokens=4, rounds=1, progress=False, breakdown=False, prefill_tokens=64)


def test_llama_bench_figures_and_ratios_come_through_every_round(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(_fake_llama_bench(tmp_path)))  # one given binary: a single variant
    gguf = tmp_path / "m.gguf"
    (tools,) = find_variants(build=False)
    anchor = LlamaBenchRounds([tools], gguf, threads=2, n_prompt=20, n_gen=6)
    r = run_bench(_engine(), PROMPT, tokens=6, rounds=3, progress=False, breakdown=False, prefill_tokens=20,
                  anchor=anchor)
    lc = r["llama_cpp"]
    calls = (tmp_path / "args").read_text().splitlines()
    # each test its own run, every round, with our threads and lengths
    assert calls == [f"-m {gguf} -t 2 -p 0 -n 6 -r 1 -o json", f"-m {gguf} -t 2 -p 20 -n 0 -r 1 -o json"] * 3
    assert lc["command"] == llama_bench_command(tools, gguf, threads=2, n_prompt=0, n_gen=6, repetitions=1)
    assert lc["tg_variant"] == lc["pp_variant"] == "given"
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


def test_with_a_context_llama_bench_decodes_at_that_depth(tmp_path, monkeypatch):
    deep = [dict(t, n_depth=300) if t["n_gen"] else t for t in RECORDED]  # tg after 300 tokens, pp from 0
    monkeypatch.setenv(ENV_VAR, str(_fake_llama_bench(tmp_path, json.dumps(deep))))
    gguf = tmp_path / "m.gguf"
    (tools,) = find_variants(build=False)
    anchor = LlamaBenchRounds([tools], gguf, threads=2, n_prompt=20, n_gen=6, depth=300)
    out = anchor.run(0)
    calls = (tmp_path / "args").read_text().splitlines()
    assert calls == [f"-m {gguf} -t 2 -p 0 -n 6 -r 1 -o json -d 300", f"-m {gguf} -t 2 -p 20 -n 0 -r 1 -o json"]
    assert anchor.command(tools, "tg")[-2:] == ["-d", "300"] and "-d" not in anchor.command(tools, "pp")
    assert out["tg"]["given"]["depth"] == 300 and out["pp"]["given"]["depth"] == 0
    # a llama-bench that ran tg from an empty context (too old for -d: no n_depth) is refused, not compared
    (tmp_path / "out.json").write_text(json.dumps(RECORDED))
    with pytest.raises(LlamaCppError, match="after 0 tokens of context, not 300"):
        anchor.run(1)


def test_each_test_runs_on_each_build_and_the_best_that_runs_it_is_the_anchor(tmp_path):
    amx = _variant_bench(tmp_path, "amx", tg=200.0, pp=None)  # fast decode, dies on every batched product
    noamx = _variant_bench(tmp_path, "noamx", tg=90.0, pp=300.0)
    gguf = tmp_path / "m.gguf"
    anchor = LlamaBenchRounds([amx, noamx], gguf, threads=2, n_prompt=20, n_gen=6)
    r = run_bench(_engine(), PROMPT, tokens=6, rounds=3, progress=False, breakdown=False, prefill_tokens=20,
                  anchor=anchor)
    lc = r["llama_cpp"]
    calls = (tmp_path / "args").read_text().splitlines()
    tg, pp = f"-m {gguf} -t 2 -p 0 -n 6 -r 1 -o json", f"-m {gguf} -t 2 -p 20 -n 0 -r 1 -o json"
    assert calls == [f"amx {tg}", f"noamx {tg}", f"amx {pp}", f"noamx {pp}",  # round 0
                     f"noamx {tg}", f"amx {tg}", f"noamx {pp}",  # the order rotates; amx is not rerun on pp
                     f"amx {tg}", f"noamx {tg}", f"noamx {pp}"]
    assert lc["tg_variant"] == "amx" and lc["tg_tokens_per_s"] == 200.0 and lc["tg_tokens_per_s_rounds"] == [200.0] * 3
    assert lc["pp_variant"] == "noamx" and lc["pp_tokens_per_s"] == 300.0
    assert lc["hire_vs_llama_cpp"] == pytest.approx(r["tokens_per_s_hire"] / 200.0)
    assert lc["prefill_vs_llama_cpp"] == pytest.approx(r["prefill_tokens_per_s"] / 300.0)
    tests = lc["tests"]
    assert tests["tg"]["variants"]["noamx"]["tokens_per_s"] == 90.0 and "failed" not in tests["tg"]["variants"]["noamx"]
    crash = tests["pp"]["variants"]["amx"]["failed"]
    assert crash["exit"] == -11 and crash["signal"] == "SIGSEGV" and crash["round"] == 0
    assert "ggml_backend_amx_mul_mat" in crash["stderr_tail"] and tests["pp"]["variants"]["amx"]["tokens_per_s_rounds"] == []
    assert tests["pp"]["command"] == llama_bench_command(noamx, gguf, threads=2, n_prompt=20, n_gen=0, repetitions=1)
    assert lc["builds"]["amx"]["build_commit"] == "c-amx" and lc["builds"]["noamx"]["source"] == "fake noamx"
    r["model"] = "tiny"
    text = format_bench(r)
    assert "best: amx of amx 200.0, noamx 90.0" in text
    assert "best: noamx of amx: cannot run it here (SIGSEGV), noamx 300.0" in text
    assert json.loads(json.dumps(r))["llama_cpp"] == lc  # the report is plain JSON


def test_a_test_that_no_build_can_run_is_a_clear_error(tmp_path):
    builds = [_variant_bench(tmp_path, "amx", tg=200.0, pp=None), _variant_bench(tmp_path, "other", tg=9.0, pp=None)]
    anchor = LlamaBenchRounds(builds, tmp_path / "m.gguf", threads=1, n_prompt=20, n_gen=6)
    with pytest.raises(LlamaCppError, match=r"no llama-bench build can run the pp test .*amx \(.*\) exited -11"):
        anchor.run(0)
    tg_only = LlamaBenchRounds(builds, tmp_path / "m.gguf", threads=1, n_prompt=0, n_gen=6)  # no pp asked: fine
    assert set(tg_only.run(0)) == {"tg"}
    with pytest.raises(ValueError, match="distinct variant names"):
        LlamaBenchRounds([builds[0], builds[0]], tmp_path / "m.gguf", threads=1)


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
    monkeypatch.setattr(llama_cpp, "variants_here", lambda: [NATIVE])  # a CPU without AMX: one build
    home = cache_location()
    (home / "bin").mkdir(parents=True)
    bench = _script(home / "bin" / "llama-bench", "exit 0\n")
    (home / "build.json").write_text(json.dumps({"commit": "abc", "simd": ["AVX2"]}))
    tools = find_tools(build=False)
    assert tools.bench == bench and tools.quantize is None and tools.build == {"commit": "abc", "simd": ["AVX2"]}
    assert tools.variant == "native"
    quantize = _script(home / "bin" / "llama-quantize", "exit 0\n")
    assert find_tools(build=False).quantize == quantize
    explicit = _fake_llama_bench(tmp_path)  # a given path wins over the cache
    assert [t.bench for t in find_variants(explicit, build=False)] == [explicit]


def test_where_the_cpu_has_amx_both_builds_are_cached_and_found(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llama_cpp, "variants_here", lambda: [WITH_AMX, WITHOUT_AMX])
    home = cache_location()
    for v in (WITH_AMX, WITHOUT_AMX):
        (home / v.folder).mkdir(parents=True)
        _script(home / v.folder / "llama-bench", "exit 0\n")
    # an older cache: bin/ built without AMX is not taken for the AMX build (the next build replaces it)
    (home / "build.json").write_text(json.dumps({"cmake_options": cmake_options(WITHOUT_AMX)}))
    with pytest.raises(LlamaCppError, match=r"no llama-bench in .*cache/llama\.cpp/0\.3\.36/bin:"):
        find_variants(build=False)
    (home / "build.json").write_text(json.dumps({"cmake_options": cmake_options(WITH_AMX)}))
    (home / "build-noamx.json").write_text(json.dumps({"cmake_options": cmake_options(WITHOUT_AMX)}))
    found = find_variants(build=False)
    assert [(t.variant, t.bench.parent.name) for t in found] == [("amx", "bin"), ("noamx", "bin-noamx")]
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in found[1].build["cmake_options"]
    assert not any("amx" in o for o in found[0].build["cmake_options"])  # as llama.cpp ships it


def test_cpu_has_amx_reads_the_cpu_flags(tmp_path):
    (tmp_path / "amx").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    (tmp_path / "plain").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\nbugs\t\t: amx_tile_not_a_flag\n")
    assert cpu_has_amx(tmp_path / "amx") and not cpu_has_amx(tmp_path / "plain")
    assert not cpu_has_amx(tmp_path / "missing")
    (tmp_path / "bf16").write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_flags(str(tmp_path / "bf16")) >= {"avx512_bf16", "avx512_vnni"} and not cpu_has_amx(tmp_path / "bf16")


def test_native_bfloat16_follows_the_cpu_flags(monkeypatch):
    from hire import system

    for flags, want in (({"avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx512f", "avx2"}, False)):
        monkeypatch.setattr(system, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert system.native_bfloat16() is want


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
    _check_parts(r, breakdown=False)
    assert r["file_tensor_bytes"] is None and r["bytes_read_over_file"] is None and "not a GGUF" in r["file_note"]


def test_bench_with_a_context_decodes_after_it_and_counts_the_kv_cache_it_reads(tmp_path, capsys):
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    fake = _script(tmp_path / "llama-bench", f'echo "$@" >> "{tmp_path}/args"\n'
                   f"echo '{json.dumps([dict(RECORDED[1], n_depth=40)])}'\n")
    assert main(["bench", "--model", str(path), "--rounds", "1", "--tokens", "4", "--prefill-tokens", "0",
                 "--context", "40", "--no-breakdown", "--head-proxy", "int8", "--head-candidates", "64",
                 "--llama-bench", str(fake), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["context_tokens"] == 40 and r["prompt_tokens"] == 40
    assert (tmp_path / "args").read_text().split()[-2:] == ["-d", "40"]
    # every layer reads all its keys and values (float16): 41..44 positions for the four tokens, 42.5 on average
    cfg = make("llama").config  # (the tiny GGUF's shapes)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    assert r["kv_cache_bytes_per_token"] == pytest.approx(42.5 * per_position)
    text = format_bench(r)
    assert "4 new tokens after 40 tokens of context" in text and "tg64 @ d40 tokens/s" in text
    assert "KV cache MiB per token" in text


def _check_parts(r: dict, breakdown: bool = True) -> None:
    """The per-part table of a report: every mode's parts and total, bytes summing to the total read
    per token, the ms those of the breakdown, gb_s = bytes / ms."""
    assert set(r["parts"]) == {"dense", "hire"}
    for mode, table in r["parts"].items():
        assert list(table) == ["head", "ffn", "attention", "other", "total"]
        assert all(set(row) == {"ms", "bytes", "gb_s"} for row in table.values())
        nbytes = r[f"bytes_{mode}"]
        assert table["total"]["bytes"] == sum(table[p]["bytes"] for p in ("head", "ffn", "attention", "other"))
        assert table["total"]["bytes"] == r[f"bytes_per_token_{mode}"]
        assert table["other"]["bytes"] == nbytes["other"] + nbytes["embedding"]  # the embedding's row is "other"
        assert all(table[p]["bytes"] == nbytes[p] for p in ("head", "ffn", "attention"))
        if not breakdown:
            assert all(row["ms"] is None and row["gb_s"] is None for row in table.values())
            continue
        ms = r[f"ms_per_part_{mode}"]
        assert all(table[p]["ms"] == ms[p] for p in ("head", "ffn", "attention", "other"))
        assert table["total"]["ms"] == pytest.approx(sum(ms.values()))
        for row in table.values():  # "other" (the step less the timed parts) may be floored at 0 ms
            assert row["gb_s"] == (pytest.approx(row["bytes"] / row["ms"] / 1e6) if row["ms"] else None)
    if breakdown:  # the roofline's FFN figure is the table's
        assert r["ffn_gb_s_dense"] == pytest.approx(r["parts"]["dense"]["ffn"]["gb_s"])
    assert r["machine_gb_s"] > 0


def test_the_per_part_table_joins_ms_and_bytes(tmp_path):
    r = run_bench(_engine(), PROMPT, tokens=6, rounds=1, progress=False, prefill_tokens=None)
    _check_parts(r)
    assert r["parts"]["hire"]["head"]["bytes"] < r["parts"]["dense"]["head"]["bytes"]  # candidates, not the vocabulary
    assert r["parts"]["hire"]["attention"] == {**r["parts"]["hire"]["attention"],
                                               "bytes": r["parts"]["dense"]["attention"]["bytes"]}
    assert json.loads(json.dumps(r))["parts"] == r["parts"]  # plain JSON
    r["model"] = "tiny"
    lines = format_bench(r).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("per part, per token"))
    head = lines[header + 1].split()
    d = r["parts"]["dense"]["head"]
    assert head[0] == "head" and head[1] == f"{d['ms']:.2f}" and head[3] == f"{d['bytes'] / 2**20:.2f}"
    assert head[5] == f"{d['gb_s']:.2f}"
    assert lines[header + 5].startswith("total (breakdown run)")
    assert lines[header + 6].startswith(f"machine read bandwidth {r['machine_gb_s']:.1f} GB/s")
    quick = run_bench(_engine(), PROMPT, tokens=4, rounds=1, progress=False, breakdown=False)
    _check_parts(quick, breakdown=False)  # bytes still, no ms
    quick["model"] = "tiny"
    assert "head" in format_bench(quick) and " - " in format_bench(quick)


def _gguf_bytes_from_shapes(path) -> int:
    """A GGUF's tensor bytes from its tensors' shapes and block formats (not from the reader's n_bytes)."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    total = 0
    for t in GGUFReader(str(path)).tensors:
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        total += int(t.n_elements) // block * size
    return total


def test_gguf_tensor_bytes_sum_the_file_s_tensors_once(tmp_path):
    from gguf import GGUFReader

    from hire.eval.bytes import gguf_tensor_bytes
    from hire.quant.load import meta_entry
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    names = [t.name for t in GGUFReader(str(path)).tensors]
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: the head is token_embd
    expected = _gguf_bytes_from_shapes(path)
    assert gguf_tensor_bytes(path) == expected  # from the loader's cached table
    (meta_entry(path) / "tensors.json").unlink()
    assert gguf_tensor_bytes(path) == expected  # from the file's header
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_tensor_bytes(tmp_path / "junk.gguf") if (tmp_path / "junk.gguf").write_bytes(b"nope") else None


def test_bench_of_a_gguf_reports_its_file_bytes_against_the_bytes_read(tmp_path, capsys):
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    args = ["bench", "--model", str(path), "--rounds", "1", "--tokens", "4", "--prefill-tokens", "0",
            "--head-proxy", "int8", "--head-candidates", "64"]
    assert main(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    _check_parts(r)
    assert r["weights"] == "gguf" and r["file_tensor_bytes"] == _gguf_bytes_from_shapes(path)
    ratio = r["bytes_read_over_file"]
    assert ratio["dense"] == pytest.approx(r["bytes_per_token_dense"] / r["file_tensor_bytes"])
    assert ratio["hire"] == pytest.approx(r["bytes_per_token_hire"] / r["file_tensor_bytes"])
    # a dense step reads each of the file's tensors about once (the tied head fully, one embedding row);
    # the F32 norms count at 16 bits, the embedding's row once more than the file has
    assert 0.95 < ratio["dense"] < 1.05  # (HiRE here reads more: an int8 proxy of a 384-row Q8_0 head)
    assert main(args + ["--no-breakdown"]) == 0
    text = capsys.readouterr().out
    assert "per part, per token" in text
    assert f"file tensors {r['file_tensor_bytes'] / 2**20:.2f} MiB, read per token / file: dense " in text
    # run dequantized (this tiny GGUF has no tokenizer to dequantize it with: the report alone), the file's
    # bytes stand but no ratio: the engine reads 16-bit copies
    dequantized = file_report(path, {"weights": "float16", "bytes_per_token_dense": 1, "bytes_per_token_hire": 1})
    assert dequantized["file_tensor_bytes"] == r["file_tensor_bytes"] and dequantized["bytes_read_over_file"] is None
    assert "dequantized" in dequantized["file_note"]
