"""hire train: a small decoder from scratch, dense / top-k / group top-k / + jointly trained head proxy."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from hire import HiReConfig, load_model
from hire.calibrate import cached_head_proxy
from hire.cli import main
from hire.data import load_corpus
from hire.layers.topk_ffn import topk_mlps
from hire.train import TrainConfig, train
from hire.errors import ConfigError
from hire.train.scratch import batch_at, density_at, hire_greedy, load_checkpoint, lr_at, save_checkpoint

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, layers=2, heads=2, seq_len=32, batch_size=4,
            warmup_steps=1, eval_every=5, eval_windows=2, save_every=4, head_k=5, head_candidates=32)


@pytest.fixture(scope="module")
def texts():
    corpus = load_corpus()
    return corpus.text("calibration")[:60_000], corpus.text("evaluation")[:20_000]


def test_training_reduces_the_loss(texts, tmp_path):
    cfg = TrainConfig(**{**TINY, "steps": 40, "density": 0.25, "lr": 5e-3})
    summary = train(cfg, tmp_path / "run", train_text=texts[0], val_text=texts[1], progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())["log"]
    assert sum(log["loss"][-5:]) / 5 < log["loss"][0] - 0.5
    assert log["val_loss"][-1] < log["val_loss"][0]
    assert summary["val_loss"] == log["val_loss"][-1]
    assert log["density"][0] == 1.0 and log["density"][-1] == 0.25  # annealed to the target
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def _tensors(path):
    return load_file(str(path))


@pytest.mark.parametrize("extra", [dict(density=0.25, head_rank=16, head_refit_every=4), dict(density=0.25, group_size=8)])
def test_resume_gives_the_uninterrupted_result(texts, tmp_path, extra):
    cfg = TrainConfig(**{**TINY, "steps": 10, **extra})
    whole = train(cfg, tmp_path / "whole", train_text=texts[0], val_text=texts[1], progress=False)
    part = train(cfg, tmp_path / "part", train_text=texts[0], val_text=texts[1], progress=False, stop_after=6)
    assert part == {"stopped_at": 6, "steps": 10, "out": str(tmp_path / "part")}
    assert not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(cfg, tmp_path / "part", train_text=texts[0], val_text=texts[1], progress=False, resume=True)
    a, b = _tensors(tmp_path / "whole" / "model.safetensors"), _tensors(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if extra.get("head_rank"):
        pa, pb = _tensors(tmp_path / "whole" / "head_proxy.safetensors"), _tensors(tmp_path / "part" / "head_proxy.safetensors")
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    la = json.loads((tmp_path / "whole" / "train_log.json").read_text())["log"]
    lb = json.loads((tmp_path / "part" / "train_log.json").read_text())["log"]
    assert la["loss"] == lb["loss"] and la["val_loss"] == lb["val_loss"]
    assert whole["val_loss"] == resumed["val_loss"]
    assert whole["hire_greedy_sample"] == resumed["hire_greedy_sample"]


def test_saved_model_and_config_decode_identically(texts, tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(**{**TINY, "steps": 12, "density": 0.25, "head_rank": 8}), out,
                    train_text=texts[0], val_text=texts[1], progress=False)
    model, tokenizer = load_model(str(out))
    assert [m.density for m in topk_mlps(model)] == [0.25, 0.25]
    config = HiReConfig.load(out / "hire_config.json")
    assert config.ffn.enabled and config.ffn.density == 0.25 and config.ffn.oversample == 2.0
    assert config.head.enabled and config.head.proxy == "lowrank" and config.head.rank == 8
    proxy = cached_head_proxy(model, config.head, torch.zeros(1, 2, dtype=torch.long), progress=False)
    ids = hire_greedy(model, tokenizer, config, proxy)
    assert ids == summary["hire_greedy_sample"]["token_ids"]


def test_hire_decode_matches_the_exact_topk_model(texts, tmp_path):
    """The written config (int4 proxy over-selecting 2x, exact rescoring) reproduces exact top-k."""
    from hire.eval import evaluate

    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "steps": 20, "density": 0.25}), out, train_text=texts[0], val_text=texts[1],
          progress=False)
    model, tokenizer = load_model(str(out))
    windows = tokenizer(texts[1][:4000], return_tensors="pt").input_ids[0][: 4 * 32].view(4, 32)
    r = evaluate(model, windows, HiReConfig.load(out / "hire_config.json"), progress=False)
    assert r["reference"] == "exact top-k FFN (density 0.25, groups of 1)"
    assert r["ffn_recall"] > 0.97 and r["greedy_agreement"] > 0.95


def test_schedules():
    cfg = TrainConfig(**{**TINY, "steps": 100, "warmup_steps": 10, "density": 0.1, "density_warmup": 0.5})
    assert lr_at(cfg, 0) == pytest.approx(cfg.lr / 10) and lr_at(cfg, 9) == pytest.approx(cfg.lr)
    assert lr_at(cfg, 99) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-2)
    assert density_at(cfg, 0) == 1.0 and density_at(cfg, 25) == pytest.approx(0.55) and density_at(cfg, 50) == 0.1
    ids = torch.arange(1000)
    assert torch.equal(batch_at(ids, cfg, 3), batch_at(ids, cfg, 3))
    assert not torch.equal(batch_at(ids, cfg, 3), batch_at(ids, cfg, 4))


@pytest.mark.parametrize("kw,match", [
    (dict(density=0.0), "density must be in"),
    (dict(density=1.2), "density must be in"),
    (dict(group_size=3), "divide the FFN width 64"),
    (dict(heads=3), "must split into 3 heads"),
    (dict(head_rank=64), "head_rank must be in"),
    (dict(head_candidates=2), "head_k <= head_candidates"),
    (dict(steps=0), "steps must be >= 1"),
])
def test_bad_configs_fail_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, **kw})


@pytest.mark.parametrize("data,message", [
    ({"steps": "5"}, "config field steps must be an integer, got '5' (str); write the number without quotes"),
    ({"lr": "fast"}, "config field lr must be a number, got 'fast' (str)"),
    ({"density": None}, "config field density must be a number, got None (NoneType)"),
    ({"layers": True}, "config field layers must be an integer, got True (bool)"),
    ([], "a train config must be a JSON object, got list"),
    ({"step": 5}, "unknown config key step: a train config takes vocab_size, hidden_size, intermediate_size, layers, "
                  "heads, seq_len, batch_size, steps, lr, warmup_steps, min_lr_ratio, weight_decay, density, group_size, "
                  "density_warmup, head_rank, head_k, head_candidates, head_temperature, head_lr, head_batch, "
                  "head_refit_every, decode_oversample, seed, eval_every, eval_windows, save_every; remove or rename it"),
])
def test_train_config_from_dict_names_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data)
    assert str(err.value) == message


def test_train_config_is_frozen_and_round_trips():
    cfg = TrainConfig(**{**TINY, "lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # an int is accepted for a float
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        dataclasses.replace(cfg, steps=0)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint, which still loads."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, None, 4, {"loss": [1.0]})
    real_save = torch.save

    def fail_half_way(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_half_way)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, None, 8, {"loss": [1.0, 0.5]})
    monkeypatch.undo()
    assert load_checkpoint(path, torch.nn.Linear(3, 2), torch.optim.AdamW(model.parameters()), None) == (4, {"loss": [1.0]})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_runs_are_not_overwritten_and_resume_checks(texts, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(TrainConfig(**TINY), out, train_text=texts[0], val_text=texts[1], progress=False, resume=True)
    train(TrainConfig(**{**TINY, "steps": 4}), out, train_text=texts[0], val_text=texts[1], progress=False, stop_after=2)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(TrainConfig(**{**TINY, "steps": 4}), out, train_text=texts[0], val_text=texts[1], progress=False)
    with pytest.raises(ValueError, match=r"different settings.*'steps': \(4, 5\)"):
        train(TrainConfig(**{**TINY, "steps": 5}), out, train_text=texts[0], val_text=texts[1], progress=False,
              resume=True)
    saved = json.loads((out / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps({**saved, "steps": "4"}))
    with pytest.raises(ConfigError, match=r"train_config.json: config field steps must be an integer, got '4' \(str\)"):
        train(TrainConfig(**{**TINY, "steps": 4}), out, train_text=texts[0], val_text=texts[1], progress=False,
              resume=True)


def test_cli_train_and_its_errors(tmp_path, capsys, monkeypatch):
    corpus = load_corpus()
    monkeypatch.setattr("hire.data.Corpus.text", lambda self, split: (
        corpus.calibration if split == "calibration" else corpus.evaluation)[sorted(
            corpus.calibration if split == "calibration" else corpus.evaluation)[0]][:40_000])
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = str(tmp_path / "cli")
    assert main(["train", "--out", out, "--steps", "4", "--stop-after", "2", *flags]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["train", "--out", out, "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["variant"] == "dense"
    assert main(["train", "--out", str(tmp_path / "bad"), "--density", "0", *flags[1:]]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--density", "0.5"]) == 2
    assert "different settings" in capsys.readouterr().err
