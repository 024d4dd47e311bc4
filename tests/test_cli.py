import json

import pytest

from hire.cli import build_config, main, make_parser


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


def test_generate_streams(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "the and of", "--max-new-tokens", "5",
                 "--head-proxy", "int8", "--head-candidates", "64"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "HiRE" in captured.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--ffn-density", "1.5"], "density must be in (0, 1]"),
        (["eval", "--head-k", "0"], "head k must be >= 1"),
        (["eval", "--head-k", "300", "--head-candidates", "100"], "must be >= k"),
        (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["eval", "--config", "/nonexistent/c.json"], "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_flags_override_the_recommended_config():
    args = make_parser().parse_args(["eval", "--model", "gemma3-270m", "--ffn-density", "0.4", "--no-head"])
    cfg = build_config(args)
    assert cfg.ffn.density == 0.4 and not cfg.head.enabled
    assert cfg.head.bits == 8 and cfg.head.stage_candidates == 4096  # from gemma3-270m's recommended settings


def test_help_describes_the_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "eval" in out and "generate" in out


def test_calibrate_writes_a_proxy_and_a_config_that_eval_uses(model_dir, tmp_path, capsys):
    out = tmp_path / "cal"
    code = main(["calibrate", "--model", model_dir, "--head-proxy", "lowrank", "--head-rank", "8", "--head-candidates", "64",
                 "--calib-windows", "4", "--eval-windows", "1", "--seq-len", "64", "--steps", "20", "--out", str(out),
                 "--plot", str(tmp_path / "loss.png"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 20 and (tmp_path / "loss.png").stat().st_size > 0
    for key in ("fitted_recall_at_1", "fitted_recall_at_k", "trained_recall_at_1", "trained_recall_at_k"):
        assert 0.0 <= result[key] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["head"]["proxy_file"] == "head_proxy.safetensors" and config["head"]["train_steps"] == 20
    assert main(["eval", "--model", model_dir, "--config", str(out / "config.json"), "--windows", "1",
                 "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["head"]["train_steps"] == 20


def test_calibrate_refuses_a_head_without_a_low_rank_proxy(model_dir, capsys):
    assert main(["calibrate", "--model", model_dir, "--head-proxy", "int8", "--head-candidates", "64"]) == 2
    assert "use --head-proxy lowrank or cascade" in capsys.readouterr().err


def test_sparsify_train_writes_a_top_k_model_that_eval_uses(model_dir, tmp_path, capsys):
    from hire import load_model
    from hire.layers.topk_ffn import topk_mlps

    out = tmp_path / "sparse"
    assert main(["sparsify-train", "--model", model_dir, "--density", "0.25", "--steps", "5", "--batch", "32",
                 "--windows", "4", "--seq-len", "32", "--eval-windows", "1", "--eval-seq-len", "32",
                 "--out", str(out), "--plot", str(tmp_path / "layers.png"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("ppl_dense", "ppl_topk_training_free", "ppl_topk_finetuned"):
        assert r[key] > 0, key
    assert r["ppl_increase"] == pytest.approx(r["ppl_topk_finetuned"] / r["ppl_dense"] - 1)
    assert (tmp_path / "layers.png").stat().st_size > 0
    model, _ = load_model(str(out))
    assert [m.density for m in topk_mlps(model)] == [0.25, 0.25]
    assert main(["eval", "--model", str(out), "--config", str(out / "hire_config.json"), "--windows", "1",
                 "--seq-len", "32", "--no-head", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["reference"].startswith("exact top-k FFN (density 0.25")
    assert ev["config"]["ffn"]["density"] == 0.25 and ev["config"]["ffn"]["oversample"] == 2.0
    assert main(["sparsify-train", "--model", model_dir, "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["sparsify-train", "--model", model_dir, "--density", "0", "--out", str(tmp_path / "x")]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err


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
    assert main(["tune", "--model", model_dir, "--no-head", "--ffn-proxy", "int8", "--windows", "2", "--seq-len", "32",
                 "--densities", "0.25,0.5,0.75", "--steps", "4", "--max-ppl-increase", "0.05", "--out", str(out),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["winner"] in ("per-layer", "uniform") and r["ppl_increase"] <= 0.05
    config = json.loads(out.read_text())
    assert (len(config["ffn"]["layer_density"]) == 2) == (r["winner"] == "per-layer")
    assert main(["eval", "--model", model_dir, "--config", str(out), "--windows", "1", "--seq-len", "32"]) == 0
