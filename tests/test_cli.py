import argparse
import json
import sys

import pytest
import torch

from hire.cli import main, make_parser
from hire.commands import VERBS
from hire.commands._args import build_config, config_fields, field_help
from hire.config import FFNConfig, HeadConfig
from hire.train.scratch import TrainConfig
from hire.train.sparse_ft import SparseFTConfig


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every binding of hire's load_model fails the test: the command must stop before loading."""
    import hire.models

    original = hire.models.load_model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was rejected")

    for name, module in list(sys.modules.items()):
        if (name == "hire" or name.startswith("hire.")) and getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", refuse)


def test_eval_json_on_a_model_directory(model_dir, capsys):
    code = main(["eval", "--model", model_dir, "--windows", "2", "--seq-len", "64", "--calib-windows", "2",
                 "--head-rank", "8", "--head-candidates", "64", "--head-stage-candidates", "128", "--ffn-density", "0.5",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model_dir
    assert result["positions"] == 128
    assert result["config"]["head"]["proxy"] == "cascade" and result["config"]["ffn"]["density"] == 0.5
    for key in ("ppl_dense", "ppl_hire", "greedy_agreement", "head_recall_at_1", "head_recall_at_k",
                "head_greedy_agreement", "ffn_recall", "bytes_per_token_dense", "bytes_per_token_hire",
                "head_bytes_fraction"):
        assert isinstance(result[key], float | int), key


def test_eval_table(model_dir, capsys):
    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "recall@50" in out and "ideal decode speedup" in out
    assert "FFN: HiRE, " in out and "density=" in out and "HiRE FFN" in out  # what ran


def test_eval_on_gguf_codes_says_the_ffn_ran_dense(tmp_path, capsys):
    """On GGUF codes the FFNs run dense (quantized_config): the table says so, and shows neither the
    unused density nor a "HiRE FFN" perplexity that is the dense one (+0.00 %)."""
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    assert main(["eval", "--model", str(path), "--windows", "1", "--seq-len", "32", "--calib-windows", "1",
                 "--head-proxy", "int8", "--head-candidates", "64", "--ffn-density", "0.65"]) == 0
    out = capsys.readouterr().out
    assert "FFN: dense (GGUF codes; the FFN density setting is not used on codes)" in out
    assert "density=" not in out and "HiRE FFN" not in out and "+0.00" not in out
    assert "FFN             dense: every neuron" in out


def test_models_lists_the_packaged_models_architectures_and_formats(capsys):
    from hire.arch import ARCHITECTURES, engine_architectures
    from hire.models import BUILTIN_MODELS
    from hire.quant import SUPPORTED

    assert main(["models", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in r["models"]] == list(BUILTIN_MODELS)
    assert {a["model_type"] for a in r["architectures"]} == set(ARCHITECTURES)
    assert {a["model_type"] for a in r["architectures"] if a["engine"]} == set(engine_architectures())
    assert set(r["gguf_formats"]) == set(SUPPORTED)
    # the bytes read per file byte, measured on the repacked codes
    assert r["gguf_formats"]["Q6_K"] == 1.0 and r["gguf_formats"]["IQ4_NL"] == 1.0
    assert r["gguf_formats"]["Q4_K"] == 148 / 144 and r["gguf_formats"]["Q3_K"] == 146 / 110
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m (default)" in out and "Q2_K 1.95x" in out and "the decode engine: llama" in out


def test_generate_help_lists_every_architecture_the_engine_runs(capsys):
    from hire.arch import ARCHITECTURES, engine_architectures

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    engine = engine_architectures()
    assert "qwen3" in engine  # one the hand-written list had left out
    listed = help_text.split("decode engine (model types ", 1)[1].split(")", 1)[0]
    assert listed.split(", ") == list(engine)
    others = help_text.split("architectures HiRE knows (", 1)[1].split(")", 1)[0]
    assert others.split(", ") == sorted(set(ARCHITECTURES) - set(engine))


def test_generate_streams(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "the and of", "--max-new-tokens", "5",
                 "--head-proxy", "int8", "--head-candidates", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the and of")
    assert "tokens/s" in captured.err and "HiRE" in captured.err


def test_generate_decodes_densely_at_once_until_the_head_is_fitted(tmp_path, capsys, monkeypatch):
    """A first run does not wait minutes for the head's proxy: it decodes densely and says how to fit
    it; --calibrate fits and caches it, and the next plain run decodes with HiRE."""
    from hire.calibrate import proxy_cache
    from test_quant import write_gguf

    proxies = tmp_path / "proxies"  # a proxy cache of this test's own (not the machine's, which keeps what it fitted)
    proxies.mkdir()
    monkeypatch.setattr(proxy_cache, "cache_dir", lambda *parts: proxies)
    path = tmp_path / "fresh.gguf"
    write_gguf(path)
    argv = ["generate", "--model", str(path), "--prompt", "the and of", "--max-new-tokens", "4", "--head-proxy",
            "lowrank", "--head-rank", "8", "--head-candidates", "64", "--head-train-steps", "0", "--calib-windows", "2",
            "--seq-len", "32"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[dense engine" in err and "dense head: the head's proxy is not fitted for this model yet" in err
    assert main([*argv, "--calibrate"]) == 0
    err = capsys.readouterr().err
    assert "[HiRE engine" in err and "dense head:" not in err
    assert main(argv) == 0  # cached now
    err = capsys.readouterr().err
    assert "[HiRE engine" in err and "dense head:" not in err


def test_a_gguf_runs_in_its_codes_unless_dequantized(tmp_path, capsys):
    from test_quant import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    assert main(["generate", "--model", str(path), "--prompt", "the and of", "--max-new-tokens", "4",
                 "--head-proxy", "int8", "--head-candidates", "64"]) == 0
    assert "HiRE engine, GGUF codes" in capsys.readouterr().err
    assert main(["bench", "--model", str(path), "--rounds", "1", "--tokens", "4", "--no-breakdown", "--json",
                 "--head-proxy", "int8", "--head-candidates", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "gguf" and report["weight_formats"] == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert report["act_bits"] == 16
    assert not report["config"]["ffn"]["enabled"]  # quantized_config: the FFNs stay dense over their codes
    assert main(["bench", "--model", str(path), "--rounds", "1", "--tokens", "4", "--no-breakdown", "--json",
                 "--head-proxy", "int8", "--head-candidates", "64", "--act-bits", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["act_bits"] == 8
    assert main(["generate", "--model", str(path), "--prompt", "the and of", "--max-new-tokens", "4",
                 "--head-proxy", "int8", "--head-candidates", "64", "--act-bits", "8"]) == 0
    assert "HiRE engine, GGUF codes, int8 activations" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--windows", "1", "--seq-len", "32", "--calib-windows", "1",
                 "--head-proxy", "int8", "--head-candidates", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "gguf" and report["ppl_increase"] == 0.0 and report["ffn_recall"] is None


# Every bad number is refused while parsing (or, for config fields and flags that depend on each
# other, right after), before a model loads: the message names the flag (or the config field) and
# what it accepts.
BAD_INPUT = [
    # hire bench
    (["bench", "--rounds", "0"], "--rounds must be an integer >= 1, got '0'"),
    (["bench", "--tokens", "1"], "--tokens must be an integer >= 2, got '1'"),
    (["bench", "--warmup", "-1"], "--warmup must be an integer >= 0, got '-1'"),
    (["bench", "--threads", "0"], "--threads must be an integer >= 1, got '0'"),
    (["bench", "--tp", "0"], "--tp must be an integer >= 1, got '0'"),
    (["bench", "--tp", "2", "--timeout", "0"], "--timeout must be a number > 0, got '0'"),
    (["bench", "--tp", "2", "--modes", "dense,fast"], "--modes takes a comma-separated subset of dense,exact,da, got 'dense,fast'"),
    (["bench", "--tp", "2", "--vs-transformers"], "--vs-transformers and --llama-cpp time one process"),
    (["bench", "--tp", "2", "--context", "512"], "--context is not measured with --tp"),
    (["bench", "--context", "-1"], "--context must be an integer >= 0, got '-1'"),
    (["bench", "--seq-len", "1"], "--seq-len must be an integer >= 2, got '1'"),
    (["bench", "--act-bits", "4"], "--act-bits: invalid choice: 4 (choose from 16, 8)"),
    (["serve", "--act-bits", "12"], "--act-bits: invalid choice: 12 (choose from 16, 8)"),
    (["bench", "--calib-windows", "0"], "--calib-windows must be an integer >= 1, got '0'"),
    # hire eval, and the config fields every model command shares
    (["eval", "--windows", "-1"], "--windows must be an integer >= 1, got '-1'"),
    (["eval", "--windows", "0"], "--windows must be an integer >= 1, got '0'"),
    (["eval", "--tp", "2", "--windows", "-3"], "--windows must be an integer >= 1, got '-3'"),
    (["eval", "--head-k", "x"], "--head-k must be an integer, got 'x'"),
    (["eval", "--ffn-density", "nan"], "--ffn-density must be a number, got 'nan'"),
    (["eval", "--head-proxy", "int2"], "argument --head-proxy: invalid choice: 'int2'"),
    (["eval", "--head-k", "0"], "head k must be >= 1, got 0"),
    (["eval", "--ffn-density", "1.5"], "ffn density must be in (0, 1], got 1.5"),
    (["eval", "--ffn-oversample", "0.5"], "ffn oversample must be >= 1"),
    (["eval", "--head-k", "300", "--head-candidates", "100"], "must be >= k"),
    (["eval", "--config", "/nonexistent/c.json"], "config file /nonexistent/c.json does not exist"),
    # hire generate
    (["generate", "--prompt", "a", "--top-k", "0"], "--top-k must be an integer >= 1, got '0'"),
    (["generate", "--prompt", "a", "--top-p", "0"], "--top-p must be a number > 0 and <= 1, got '0'"),
    (["generate", "--prompt", "a", "--top-p", "1.5"], "--top-p must be a number > 0 and <= 1, got '1.5'"),
    (["generate", "--prompt", "a", "--temperature", "-1"], "--temperature must be a number >= 0, got '-1'"),
    (["generate", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got '0'"),
    (["generate", "--prompt", "a", "--seed", "x"], "--seed must be an integer, got 'x'"),
    # hire calibrate
    (["calibrate", "--steps", "0"], "--steps must be an integer >= 1, got '0'"),
    (["calibrate", "--eval-windows", "0"], "--eval-windows must be an integer >= 1, got '0'"),
    (["calibrate", "--head-proxy", "int8", "--head-candidates", "64"], "use --head-proxy lowrank or cascade"),
    # hire train (its config fields)
    (["train", "--out", "x", "--stop-after", "0"], "--stop-after must be an integer >= 1, got '0'"),
    (["train", "--out", "x", "--threads", "0"], "--threads must be an integer >= 1, got '0'"),
    (["train", "--out", "x", "--steps", "ten"], "--steps must be an integer, got 'ten'"),
    (["train", "--out", "x", "--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["train", "--out", "x", "--steps", "0"], "steps must be >= 1, got 0"),
    (["train", "--out", "x", "--density", "0"], "density must be in (0, 1]"),
    # hire sparsify-train
    (["sparsify-train", "--windows", "-2"], "--windows must be an integer >= 1, got '-2'"),
    (["sparsify-train", "--eval-windows", "0"], "--eval-windows must be an integer >= 1, got '0'"),
    (["sparsify-train", "--eval-seq-len", "1"], "--eval-seq-len must be an integer >= 2, got '1'"),
    (["sparsify-train", "--oversample", "0.5"], "--oversample must be a number >= 1, got '0.5'"),
    (["sparsify-train", "--allocate-densities", "0,0.5"], "--allocate-densities must be comma-separated numbers in (0, 1], got '0,0.5'"),
    (["sparsify-train", "--allocate-densities", "0.1,x"], "--allocate-densities must be comma-separated numbers in (0, 1]"),
    (["sparsify-train", "--sensitivity-windows", "0"], "--sensitivity-windows must be an integer >= 1, got '0'"),
    (["sparsify-train", "--allocate", "--sensitivity-windows", "5", "--windows", "2"],
     "--sensitivity-windows (5) must be <= --windows (2)"),
    (["sparsify-train", "--batch", "x"], "--batch must be an integer, got 'x'"),
    (["sparsify-train", "--density", "0"], "density must be in (0, 1], got 0.0"),
    (["sparsify-train", "--lr", "0"], "lr > 0"),
    # hire tune
    (["tune", "--max-ppl-increase", "0"], "--max-ppl-increase must be a number > 0, got '0'"),
    (["tune", "--max-ppl-increase", "-0.1"], "--max-ppl-increase must be a number > 0, got '-0.1'"),
    (["tune", "--windows", "0"], "--windows must be an integer >= 1, got '0'"),
    (["tune", "--sensitivity-windows", "0"], "--sensitivity-windows must be an integer >= 1, got '0'"),
    (["tune", "--densities", "0.5,2"], "--densities must be comma-separated numbers in (0, 1], got '0.5,2'"),
    (["tune", "--steps", "-1"], "--steps must be an integer >= 0, got '-1'"),
    (["tune", "--no-ffn"], "the FFN is disabled in this config (--no-ffn): nothing to tune"),
    # hire scaling
    (["scaling", "--devices", "1,x"], "--devices must be comma-separated integers >= 1, got '1,x'"),
    (["scaling", "--devices", "0,8"], "--devices must be comma-separated integers >= 1, got '0,8'"),
    (["scaling", "--models", "5B"], "--models takes a comma-separated subset of 1B,3B,8B,70B, got '5B'"),
    (["scaling", "--repeats", "0"], "--repeats must be an integer >= 1, got '0'"),
    (["scaling", "--tp", "0"], "--tp must be an integer >= 1, got '0'"),
    (["scaling", "--tp", "1"], "fitting the link needs --tp >= 2 ranks (or --no-measure), got --tp 1"),
    (["scaling", "--timeout", "-5"], "--timeout must be a number > 0, got '-5'"),
    (["scaling", "--mem-gbs", "0"], "--mem-gbs must be a number > 0, got '0'"),
    (["scaling", "--link-gbs", "-1"], "--link-gbs must be a number > 0, got '-1'"),
    (["scaling", "--link-latency-us", "-1"], "--link-latency-us must be a number >= 0, got '-1'"),
    (["scaling", "--no-measure", "--measured", "b.json"], "--measured checks the fitted link: it needs the fit"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_before_a_model_loads(argv, message, no_model_loads, capsys):
    # a model that does not exist: had the check come after loading, the error would be another
    assert main([*argv[:1], *(["--model", "/no/such/model"] if argv[0] not in ("train", "scaling") else []),
                 *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_bad_input_names_the_command(capsys):
    assert main(["bench", "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hire bench") and "hire bench: error: --rounds must be" in err


def test_an_unknown_model_is_a_clear_error(capsys):
    assert main(["eval", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_every_numeric_flag_is_range_checked():
    """No verb has a bare int/float flag: each goes through a type that names the allowed range."""
    parser = make_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(verbs) == set(VERBS)
    for verb, sub in verbs.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"hire {verb} {action.option_strings}: a bare {action.type.__name__}"


def test_every_config_flag_has_its_help_line():
    """Each flag derived from a config field shows that field's reason, once, % escaped for argparse."""
    for cls in (HeadConfig, FFNConfig, TrainConfig, SparseFTConfig):
        for f, _ in config_fields(cls):
            assert f.metadata["help"] and field_help(cls, f) == f.metadata["help"].replace("%", "%%")
    verbs = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    train_help = verbs["train"].format_help()
    assert "top-10%" in train_help  # argparse rendered the escaped % (an unescaped one raises)


@pytest.mark.parametrize("content,names", [
    ({"head": {"k": "5"}}, ("head", "k")),
    ({"head": 5}, ("head",)),
    ([], ()),
])
def test_config_files_with_wrong_types_are_clear_errors(content, names, tmp_path, capsys, no_model_loads):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    assert main(["eval", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hire: error:") and "Traceback" not in err
    for name in names:
        assert name in err


def test_verbose_prints_the_traceback_with_the_error(capsys):
    assert main(["-v", "eval", "--config", "/nonexistent/c.json"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "hire: error: config file /nonexistent/c.json does not exist" in err
    assert main(["eval", "--config", "/nonexistent/c.json"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_runtime_error_from_torch_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        return torch.ones(2) @ torch.ones(3)  # RuntimeError inside torch: a bug, not a user's mistake

    monkeypatch.setattr("hire.commands.eval.evaluate_model", broken)
    with pytest.raises(RuntimeError, match="size"):
        main(["eval", "--model", "/no/such/model"])


def test_flags_override_the_recommended_config():
    args = make_parser().parse_args(["eval", "--model", "gemma3-270m", "--ffn-density", "0.4", "--no-head"])
    cfg = build_config(args)
    assert cfg.ffn.density == 0.4 and not cfg.head.enabled
    assert cfg.head.bits == 8 and cfg.head.stage_candidates == 8192  # from gemma3-270m's recommended settings


def test_help_describes_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb, module in VERBS.items():
        assert verb in out
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert " ".join(module.DESCRIPTION.split())[:60] in text, verb
        if verb in ("calibrate", "sparsify-train", "tune", "scaling", "bench"):
            assert "--force" in text, verb


def test_calibrate_into_the_model_directory_keeps_its_config(model_dir, tmp_path, capsys):
    """OUT may be the model's own directory: hire_config.json and head_proxy.safetensors go beside
    the model's config.json, which stays as it was (the model still loads); a second run is refused
    without --force."""
    from pathlib import Path

    from hire import load_model

    model_config = (Path(model_dir) / "config.json").read_bytes()
    code = main(["calibrate", "--model", model_dir, "--head-proxy", "lowrank", "--head-rank", "8", "--head-candidates",
                 "64", "--calib-windows", "4", "--eval-windows", "1", "--seq-len", "64", "--steps", "20", "--out",
                 model_dir, "--plot", str(tmp_path / "loss.png"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 20 and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    for key in ("fitted_recall_at_1", "fitted_recall_at_k", "trained_recall_at_1", "trained_recall_at_k"):
        assert 0.0 <= result[key] <= 1.0
    assert (Path(model_dir) / "config.json").read_bytes() == model_config
    load_model(model_dir)
    written = Path(model_dir) / "hire_config.json"
    assert result["config"] == str(written)
    config = json.loads(written.read_text())
    assert config["head"]["proxy_file"] == "head_proxy.safetensors" and config["head"]["train_steps"] == 20
    assert main(["eval", "--model", model_dir, "--config", str(written), "--windows", "1", "--seq-len", "32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["head"]["train_steps"] == 20

    again = ["calibrate", "--model", model_dir, "--head-proxy", "lowrank", "--head-rank", "8", "--head-candidates", "64",
             "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "32", "--steps", "2", "--out", model_dir]
    before = written.read_bytes()
    assert main(again) == 2
    err = capsys.readouterr().err
    assert f"{written} exists (file); pass --force to overwrite it or choose another --out" in err
    assert written.read_bytes() == before
    assert main([*again, "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert json.loads(written.read_text())["head"]["train_steps"] == 2
    assert (Path(model_dir) / "config.json").read_bytes() == model_config


@pytest.mark.parametrize("argv,existing,flag", [
    (["calibrate", "--head-proxy", "lowrank", "--out", "{d}"], "{d}/head_proxy.safetensors", "--out"),
    (["calibrate", "--head-proxy", "lowrank", "--out", "{d}", "--plot", "{d}/p.png"], "{d}/p.png", "--plot"),
    (["tune", "--out", "{d}/t.json"], "{d}/t.json", "--out"),
    (["sparsify-train", "--out", "{d}/s"], "{d}/s", "--out"),
    (["sparsify-train", "--out", "{d}/new", "--plot", "{d}/p.png"], "{d}/p.png", "--plot"),
    (["bench", "--plot", "{d}/p.png"], "{d}/p.png", "--plot"),
    (["bench", "--tp", "2", "--plot", "{d}/p.png"], "{d}/p.png", "--plot"),
    (["scaling", "--no-measure", "--out", "{d}/s.json"], "{d}/s.json", "--out"),
    (["scaling", "--out", "{d}/s.json"], "{d}/s.json", "--out"),  # before torchrun is launched
    (["scaling", "--no-measure", "--plot", "{d}/s.png"], "{d}/s.png", "--plot"),
])
def test_existing_outputs_are_refused_before_a_model_loads(argv, existing, flag, tmp_path, no_model_loads, capsys):
    d = str(tmp_path)
    path = tmp_path / existing.format(d=d)
    if existing.endswith("/s"):
        path.mkdir()
        (path / "weights.bin").write_bytes(b"the user's")
    else:
        path.write_bytes(b"the user's")
    argv = [a.format(d=d) for a in argv]
    if argv[0] != "scaling":
        argv[1:1] = ["--model", "/no/such/model"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path} exists" in err and "pass --force" in err and flag in err
    assert (path / "weights.bin" if path.is_dir() else path).read_bytes() == b"the user's"


def test_sparsify_train_force_never_replaces_a_directory_it_did_not_write(tmp_path, no_model_loads, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert main(["sparsify-train", "--model", "/no/such/model", "--out", str(user), "--force"]) == 2
    assert "is not a directory hire sparsify-train wrote" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep"


def test_sparsify_train_writes_a_top_k_model_that_eval_uses(model_dir, tmp_path, capsys):
    from hire import load_model
    from hire.layers.topk_ffn import topk_mlps

    out = tmp_path / "sparse"
    run = ["sparsify-train", "--model", model_dir, "--density", "0.25", "--steps", "5", "--batch", "32",
           "--windows", "4", "--seq-len", "32", "--eval-windows", "1", "--eval-seq-len", "32", "--out", str(out)]
    assert main([*run, "--plot", str(tmp_path / "layers.png"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("ppl_dense", "ppl_topk_training_free", "ppl_topk_finetuned"):
        assert r[key] > 0, key
    assert r["ppl_increase"] == pytest.approx(r["ppl_topk_finetuned"] / r["ppl_dense"] - 1)
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left behind
    model, _ = load_model(str(out))
    assert [m.density for m in topk_mlps(model)] == [0.25, 0.25]
    assert json.loads((out / "sparse_ft.json").read_text())["ppl_dense"] == r["ppl_dense"]
    assert main(["eval", "--model", str(out), "--config", str(out / "hire_config.json"), "--windows", "1",
                 "--seq-len", "32", "--no-head", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["reference"].startswith("exact top-k FFN (density 0.25")
    assert ev["config"]["ffn"]["density"] == 0.25 and ev["config"]["ffn"]["oversample"] == 2.0
    assert main(run) == 2
    assert f"{out} exists (directory); pass --force" in capsys.readouterr().err
    assert main([*run[:4], "0.5", *run[5:], "--force", "--json"]) == 0  # its own export: replaced whole
    capsys.readouterr()
    assert [m.density for m in topk_mlps(load_model(str(out))[0])] == [0.5, 0.5]


def test_sparsify_train_allocates_per_layer_densities(model_dir, tmp_path, capsys):
    out = tmp_path / "alloc"
    assert main(["sparsify-train", "--model", model_dir, "--density", "0.3", "--allocate", "--allocate-densities",
                 "0.1,0.5", "--sensitivity-windows", "1", "--steps", "2", "--batch", "16", "--windows", "2",
                 "--seq-len", "32", "--eval-windows", "1", "--eval-seq-len", "32", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    dens = r["config"]["layer_density"]
    assert len(dens) == 2 and set(dens) <= {0.1, 0.3, 0.5} and r["mean_density"] <= 0.3 + 1e-9
    assert json.loads((out / "hire_config.json").read_text())["ffn"]["layer_density"] == dens
    assert json.loads((out / "config.json").read_text())["hire_topk"]["density"] == pytest.approx(r["mean_density"])


def test_tune_writes_a_per_layer_or_uniform_config(model_dir, tmp_path, capsys):
    out = tmp_path / "tuned.json"
    run = ["tune", "--model", model_dir, "--no-head", "--ffn-proxy", "int8", "--windows", "2", "--seq-len", "32",
           "--densities", "0.25,0.5,0.75", "--steps", "4", "--max-ppl-increase", "0.05", "--out", str(out)]
    assert main([*run, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["winner"] in ("per-layer", "uniform") and r["ppl_increase"] <= 0.05
    config = json.loads(out.read_text())
    assert (len(config["ffn"]["layer_density"]) == 2) == (r["winner"] == "per-layer")
    assert main(["eval", "--model", model_dir, "--config", str(out), "--windows", "1", "--seq-len", "32"]) == 0
    capsys.readouterr()
    assert main(run) == 2
    assert f"{out} exists (file); pass --force" in capsys.readouterr().err
    assert main([*run, "--force"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_generate_streams_through_transformers_for_other_architectures(model_dir, tmp_path, capsys):
    """GPT-2 is not an engine layout: the patched model's generate() streams instead."""
    import shutil
    from pathlib import Path

    from tiny_models import make

    gpt2 = tmp_path / "gpt2"  # model_dir's tokenizer, a GPT-2 model
    make("gpt2").save_pretrained(gpt2)
    for tokenizer_file in Path(model_dir).glob("*token*"):
        shutil.copy(tokenizer_file, gpt2)
    assert json.loads((gpt2 / "config.json").read_text())["model_type"] == "gpt2"
    assert main(["generate", "--model", str(gpt2), "--prompt", "the and of", "--max-new-tokens", "4",
                 "--head-proxy", "int8", "--head-candidates", "64", "--temperature", "0.8", "--top-k", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the and of")
    assert "through transformers generate()" in captured.err and "HiRE: 4 tokens" in captured.err


WORDS = "the and of to a i you my in that is not with me it be your his this but he have as thou so".split()


def _text(path, n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return str(path)


def test_eval_on_the_users_text_per_domain(model_dir, tmp_path, capsys):
    one, two = _text(tmp_path / "prose.txt", 400), _text(tmp_path / "chat.txt", 400, seed=1)
    assert main(["eval", "--model", model_dir, "--windows", "2", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64", "--text", one, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == one and result["positions"] == 64
    assert main(["eval", "--model", model_dir, "--windows", "2", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64", "--text", one, "--text", two, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["domains"]) == [one, two]
    recalls = [r["head_recall_at_1"] for r in result["domains"].values()]
    assert result["worst"]["head_recall_at_1"] == min(recalls)
    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64", "--text", one, "--text", two]) == 0
    assert "worst over 2 domains" in capsys.readouterr().out


def test_calibrate_and_tune_on_the_users_text(model_dir, tmp_path, capsys):
    calib = tmp_path / "mine"
    calib.mkdir()
    _text(calib / "a.txt", 300)
    (calib / "b.jsonl").write_text("\n".join(json.dumps({"text": " ".join(WORDS)}) for _ in range(20)))
    held = _text(tmp_path / "held.txt", 300, seed=3)
    assert main(["calibrate", "--model", model_dir, "--steps", "2", "--seq-len", "32", "--calib-windows", "2",
                 "--eval-windows", "1", "--head-rank", "8", "--head-candidates", "64", "--head-stage-candidates", "128",
                 "--text", str(calib), "--eval-text", held, "--out", str(tmp_path / "out"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["calibration_text"] == str(calib) and r["held_out_text"] == held
    assert main(["tune", "--model", model_dir, "--seq-len", "32", "--windows", "2", "--steps", "2",
                 "--text", str(calib), "--out", str(tmp_path / "tuned.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == str(calib)


@pytest.mark.parametrize("content, message", [
    (b"", "empty.txt holds no text"),
    (b"the and of", "short.txt is too short for one window of 32 tokens"),
    (b"\x00\x9f\x92\x96junk", "junk.txt is not text"),
])
def test_bad_text_is_an_error_naming_the_file(model_dir, tmp_path, capsys, content, message):
    name = message.split()[0]
    (tmp_path / name).write_bytes(content)
    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64", "--text", str(tmp_path / name)]) == 2
    assert message in capsys.readouterr().err


def test_bad_text_sources_fail_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"body": 1}\n')
    for argv, message in ((["eval", "--text", str(tmp_path / "x.jsonl")], "x.jsonl, line 1: JSONL records need"),
                          (["calibrate", "--text", str(tmp_path / "nope")], "nope does not exist"),
                          (["tune", "--text", str(tmp_path / "nope")], "nope does not exist")):
        assert main([*argv, "--model", "/no/such/model"]) == 2
        assert message in capsys.readouterr().err


def test_eval_and_calibrate_on_the_packaged_domains(model_dir, tmp_path, capsys):
    from hire.data import UNSEEN_DOMAINS

    assert main(["eval", "--model", model_dir, "--windows", "1", "--seq-len", "32", "--head-proxy", "int8",
                 "--head-candidates", "64", "--domains", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["domains"]) == ["prose", "python", "docs", "c", "english-chat", "languages"]
    assert result["unseen"] == list(UNSEEN_DOMAINS) and result["worst"]["head_recall_at_1"] is not None
    # no --text: calibrated on the packaged calibration domains, recall on each held-out one and the worst
    assert main(["calibrate", "--model", model_dir, "--steps", "2", "--seq-len", "32", "--calib-windows", "5",
                 "--eval-windows", "1", "--head-rank", "8", "--head-candidates", "64", "--head-stage-candidates", "128",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["calibration_states"] == 5 * 32 and r["held_out_text"] == "packaged held-out domains"
    assert list(r["held_out"]) == list(result["domains"])
    assert r["trained_recall_at_k"] == min(d["trained_recall_at_k"] for d in r["held_out"].values())
