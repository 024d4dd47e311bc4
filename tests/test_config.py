import dataclasses
import json
import pathlib

import pytest

from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.errors import ConfigError, HireError


def test_json_round_trip(tmp_path):
    cfg = HiReConfig(head=HeadConfig(k=20, candidates=100, proxy="lowrank", rank=32), ffn=FFNConfig(density=0.4, group_size=8))
    path = tmp_path / "c.json"
    cfg.save(path)
    assert HiReConfig.load(path) == cfg
    assert HiReConfig.from_json(cfg.to_json()).to_dict() == cfg.to_dict()


def test_json_round_trip_with_layer_densities(tmp_path):
    cfg = HiReConfig(ffn=FFNConfig(layer_density=[0.25, 0.5, 1]))  # a list (and an int) given...
    assert cfg.ffn.layer_density == (0.25, 0.5, 1.0)  # ...is stored as a tuple of floats
    assert cfg.to_dict()["ffn"]["layer_density"] == [0.25, 0.5, 1.0]  # JSON-shaped: a list
    assert json.loads(cfg.to_json())["ffn"]["layer_density"] == [0.25, 0.5, 1.0]
    assert HiReConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.json")
    loaded = HiReConfig.load(tmp_path / "c.json")
    assert loaded == cfg and isinstance(loaded.ffn.layer_density, tuple)
    assert HiReConfig.from_dict({"ffn": {"density": 1}}).ffn.density == 1.0  # an int is accepted for a float


def test_to_dict_is_a_copy():
    cfg = HiReConfig()
    data = cfg.to_dict()
    data["head"]["k"] = 7
    data["ffn"]["layer_density"].append(0.5)
    assert cfg == HiReConfig()


def test_configs_are_frozen_and_replace_validates():
    cfg = HiReConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.head.k = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ffn = FFNConfig()
    with pytest.raises(ConfigError, match=r"head candidates \(k'\) must be >= k"):
        dataclasses.replace(cfg.head, k=1000)
    with pytest.raises(ConfigError, match=r"ffn layer_density values must be in \(0, 1\]"):
        dataclasses.replace(cfg.ffn, layer_density=[0.5, 2.0])
    with pytest.raises(ConfigError, match=r"config field head.k must be an integer, got '5' \(str\)"):
        dataclasses.replace(cfg.head, k="5")  # types are checked on every construction, not only from JSON
    changed = dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, layer_density=[0.5, 0.6]))
    assert changed.ffn.layer_density == (0.5, 0.6) and cfg.ffn.layer_density == ()
    assert HiReConfig(head={"k": 5, "candidates": 64}).head == HeadConfig(k=5, candidates=64)


@pytest.mark.parametrize(
    "data,message",
    [
        # the three from the issue
        ({"head": {"k": "5"}}, "config field head.k must be an integer, got '5' (str); write the number without quotes"),
        ({"head": 5}, "config field head must be an object (JSON {...}) with keys enabled, k, candidates, proxy, rank, "
                      "rank_bits, bits, group_size, stage_candidates, train_steps, proxy_file, select_blocks, optimism, auto, got 5 (int)"),
        ([], "a HiRE config must be a JSON object, got list"),
        ("cascade", "a HiRE config must be a JSON object, got str"),
        (None, "a HiRE config must be a JSON object, got NoneType"),
        # other wrong types
        ({"head": {"k": True}}, "config field head.k must be an integer, got True (bool)"),  # bool is not an int
        ({"head": {"k": 5.5}}, "config field head.k must be an integer, got 5.5 (float)"),
        ({"head": {"enabled": 1}}, "config field head.enabled must be true or false, got 1 (int)"),
        ({"head": {"enabled": "false"}}, "config field head.enabled must be true or false, got 'false' (str)"),
        ({"head": {"proxy": 4}}, "config field head.proxy must be a string, got 4 (int)"),
        ({"head": {"proxy_file": None}}, "config field head.proxy_file must be a string, got None (NoneType)"),
        ({"ffn": {"density": "0.5"}}, "config field ffn.density must be a number, got '0.5' (str); write the number "
                                      "without quotes"),
        ({"ffn": {"density": "half"}}, "config field ffn.density must be a number, got 'half' (str)"),
        ({"ffn": {"density": False}}, "config field ffn.density must be a number, got False (bool)"),
        ({"ffn": {"layer_density": 0.5}}, "config field ffn.layer_density must be a list of numbers, got 0.5 (float)"),
        ({"ffn": {"layer_density": "0.5,0.6"}}, "config field ffn.layer_density must be a list of numbers, got "
                                                "'0.5,0.6' (str)"),
        ({"ffn": {"layer_density": [0.5, "x"]}}, "config field ffn.layer_density must be a list of numbers; item 1 is "
                                                 "'x' (str)"),
        ({"ffn": {"layer_density": [0.5, None]}}, "config field ffn.layer_density must be a list of numbers; item 1 is "
                                                  "None (NoneType)"),
        ({"ffn": [0.5]}, "config field ffn must be an object (JSON {...}) with keys enabled, density, oversample, proxy, "
                         "bits_group_size, group_size, aggregate, layer_density, got [0.5] (list)"),
        ({"version": "1"}, "config field version must be an integer, got '1' (str); write the number without quotes"),
        # unknown keys, named
        ({"heads": {}}, "unknown config key heads: a HiRE config takes head, ffn, version; remove or rename it"),
        ({"head": {"kk": 3, "kprime": 4}}, "unknown config keys head.kk, head.kprime: the head section takes enabled, k, "
                                           "candidates, proxy, rank, rank_bits, bits, group_size, stage_candidates, "
                                           "train_steps, proxy_file, select_blocks, optimism, auto; remove or rename them"),
        # right types, wrong values: the __post_init__ checks
        ({"head": {"k": 0}}, "head k must be >= 1, got 0"),
        ({"ffn": {"layer_density": [0.5, 1.5]}}, "ffn layer_density values must be in (0, 1], got [1.5]"),
        ({"version": 99}, "config version 99 is not supported (this HiRE reads version 1)"),
    ],
)
def test_bad_config_data_names_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        HiReConfig.from_dict(data)
    assert str(err.value) == message
    assert isinstance(err.value, HireError) and isinstance(err.value, ValueError)  # the CLI prints it, no traceback


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"head": {"k": "5"}}', "config field head.k must be an integer, got '5' (str)"),
        ('{"head": 5}', "config field head must be an object (JSON {...})"),
        ("[]", "a HiRE config must be a JSON object, got list"),
        ('"int4"', "a HiRE config must be a JSON object, got str"),
    ],
)
def test_bad_config_files_name_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        HiReConfig.load(path)
    assert str(err.value).startswith(f"config file {path}: {message}")


def test_bad_json_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HiReConfig.load(bad)
    with pytest.raises(ConfigError, match="must be valid JSON"):
        HiReConfig.from_json("{not json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HiReConfig.load(tmp_path / "missing.json")
    assert json.loads(HiReConfig().to_json())["version"] == 1


def test_load_resolves_the_proxy_file_against_the_config_folder(tmp_path):
    cfg = HiReConfig(head=HeadConfig(proxy="lowrank", proxy_file="head_proxy.safetensors"))
    cfg.save(tmp_path / "c.json")
    loaded = HiReConfig.load(tmp_path / "c.json")
    assert loaded.head.proxy_file == str(tmp_path / "head_proxy.safetensors")
    assert cfg.head.proxy_file == "head_proxy.safetensors"  # the saved config is not changed
    assert dataclasses.replace(loaded, head=dataclasses.replace(loaded.head, proxy_file="")) == \
        dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, proxy_file=""))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the old file as it was, and no temporary file behind."""
    path = tmp_path / "c.json"
    old = HiReConfig(head=HeadConfig(k=20, candidates=100))
    old.save(path)
    before = path.read_text()

    def fail_half_way(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        HiReConfig(head=HeadConfig(k=30, candidates=100)).save(path)
    monkeypatch.undo()
    assert path.read_text() == before and HiReConfig.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "head k must be >= 1"),
        (dict(k=-3), "head k must be >= 1"),
        (dict(k=50, candidates=10), r"candidates \(k'\) must be >= k"),
        (dict(proxy="pca"), "head proxy must be one of"),
        (dict(rank=0), "rank"),
        (dict(bits=3), "bits"),
        (dict(rank_bits=2), "rank_bits"),
        (dict(rank_bits=4, optimism=4.0), "4-bit U"),
        (dict(proxy="cascade", candidates=300, stage_candidates=200), "stage_candidates"),
        (dict(select_blocks=-1), "select_blocks must be >= 0"),
        (dict(proxy="cascade", stage_candidates=4096, select_blocks=3), r"select_blocks=3 must divide .*\(4096\)"),
        (dict(proxy="int8", candidates=256, select_blocks=512), r"must divide .*\(256\)"),
    ],
)
def test_bad_head_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(density=0.0), r"density must be in \(0, 1\]"),
        (dict(density=1.5), r"density must be in \(0, 1\]"),
        (dict(oversample=0.5), "oversample"),
        (dict(proxy="int2"), "ffn proxy"),
        (dict(group_size=0), "group_size"),
        (dict(aggregate="mean"), "aggregate"),
    ],
)
def test_bad_ffn_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FFNConfig(**kwargs)


