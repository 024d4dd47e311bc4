import json

import pytest

from hire.config import FFNConfig, HeadConfig, HiReConfig


def test_json_round_trip(tmp_path):
    cfg = HiReConfig(head=HeadConfig(k=20, candidates=100, proxy="lowrank", rank=32), ffn=FFNConfig(density=0.4, group_size=8))
    path = tmp_path / "c.json"
    cfg.save(path)
    assert HiReConfig.load(path) == cfg
    assert HiReConfig.from_json(cfg.to_json()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "head k must be >= 1"),
        (dict(k=-3), "head k must be >= 1"),
        (dict(k=50, candidates=10), r"candidates \(k'\) must be >= k"),
        (dict(proxy="pca"), "head proxy must be one of"),
        (dict(rank=0), "rank"),
        (dict(bits=3), "bits"),
        (dict(rank_bits=4), "rank_bits"),
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


def test_unknown_keys_and_versions(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        HiReConfig.from_dict({"heads": {}})
    with pytest.raises(ValueError, match="unknown head config keys"):
        HiReConfig.from_dict({"head": {"kk": 3}})
    with pytest.raises(ValueError, match="version 99"):
        HiReConfig.from_dict({"version": 99})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HiReConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HiReConfig.load(tmp_path / "missing.json")
    assert json.loads(HiReConfig().to_json())["version"] == 1
