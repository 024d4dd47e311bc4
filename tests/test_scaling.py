"""The tensor-parallel scaling model: its pieces against hand counts, the link fit against known
parameters, and `hire scaling` end to end (with a 2-rank gloo fit)."""

import json
import subprocess
import sys

import pytest

from hire.distributed import scaling as sc

M = sc.MODELS["8B"]
HW = sc.HARDWARE["nvlink"]
HIRE = sc.HiReShape()


def test_one_device_has_no_collectives_and_reads_the_whole_model():
    assert sc.collectives(M, HIRE, "dense", 1) == []
    dense = sc.bytes_per_device(M, HIRE.__class__(context=0), "dense", 1)
    assert dense == pytest.approx(2 * (M.params - M.vocab * M.hidden), rel=1e-9)  # 16-bit; the embedding is not read
    t = sc.token_seconds(M, HW, HIRE, "dense", 1)
    assert t["ms_collectives"] == 0 and t["tokens_per_s"] == pytest.approx(HW.mem_gbs * 1e9 / sc.bytes_per_device(M, HIRE, "dense", 1))


def test_da_has_the_dense_collectives_and_exact_adds_one_gather_per_selection():
    P = 8
    dense = sc.collectives(M, HIRE, "dense", P)
    da = sc.collectives(M, HIRE, "da", P)
    exact = sc.collectives(M, HIRE, "exact", P)
    assert len(dense) == len(da) == 2 * M.layers + 1
    assert len(exact) == len(da) + M.layers + 2  # one FFN selection per layer + the cascade's two head stages
    over = sc.collectives(M, sc.HiReShape(ffn_oversample=2.0), "exact", P)
    assert len(over) == len(exact) + M.layers


@pytest.mark.parametrize("mode", sc.MODES)
def test_bytes_per_device_fall_with_more_devices(mode):
    sizes = [sc.bytes_per_device(M, HIRE, mode, P) for P in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))


def test_da_is_never_slower_than_exact_and_hire_reads_fewer_bytes_than_dense():
    rows = sc.scaling_table(sc.HARDWARE)
    by = {(r["hardware"], r["model"], r["devices"], r["mode"]): r for r in rows}
    for (hw, model, P, mode), r in by.items():
        if mode == "da":
            assert r["tokens_per_s"] >= by[(hw, model, P, "exact")]["tokens_per_s"]
            assert r["ms_weights"] < by[(hw, model, P, "dense")]["ms_weights"]


def test_fit_link_recovers_the_parameters_it_models():
    latency, gbs, P = 40e-6, 1.5, 2
    times = {op: {n: sc.collective_seconds(op, n, P, latency, gbs * 1e9) for n in (8, 512, 32768, 2097152)}
             for op in ("all_reduce", "all_gather")}
    fit = sc.fit_link(times, P)
    assert fit["link_latency_us"] == pytest.approx(40, rel=1e-6)
    assert fit["link_gbs"] == pytest.approx(1.5, rel=1e-6)


def test_cli_scaling_model_only_writes_table_and_plot(tmp_path, capsys):
    from hire.cli import main

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    run = ["scaling", "--no-measure", "--models", "1B,70B", "--devices", "1,8,64", "--link-gbs", "50",
           "--out", str(out), "--plot", str(png)]
    assert main(run) == 0
    assert "modelled tokens/s" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {r["hardware"] for r in result["table"]} == {"nvlink", "ici", "custom"}
    assert result["hardware"]["custom"]["link_gbs"] == 50 and result["hardware"]["custom"]["mem_gbs"] == 3350
    assert len(result["table"]) == 3 * 2 * 3 * 3 and png.stat().st_size > 10_000
    assert main(["scaling", "--no-measure", "--models", "5B"]) == 2
    assert main([*run[:-4], "--out", str(out)]) == 2  # the report exists: kept
    assert f"{out} exists (file); pass --force" in capsys.readouterr().err
    assert json.loads(out.read_text()) == result
    assert main([*run[:-4], "--models", "8B", "--out", str(out), "--force"]) == 0
    assert set(json.loads(out.read_text())["models"]) == {"8B"}


def test_cli_scaling_fits_gloo_on_two_ranks(tmp_path):
    bench = {"tp": 2, "model": "m", "modes": {
        "exact": {"ms_per_token": 30.0, "collectives_per_token": 3, "collectives_per_token_by_kind": {"ffn": 2, "ffn_select": 1},
                  "bytes_exchanged_per_token_by_kind": {"ffn": 8192, "ffn_select": 8000}},
        "da": {"ms_per_token": 20.0, "collectives_per_token": 2, "collectives_per_token_by_kind": {"ffn": 2},
               "bytes_exchanged_per_token_by_kind": {"ffn": 8192}}}}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    run = subprocess.run([sys.executable, "-m", "hire", "scaling", "--tp", "2", "--repeats", "3", "--models", "1B",
                          "--devices", "1,2", "--measured", str(tmp_path / "b.json"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    g = result["measured_gloo"]
    assert g["ranks"] == 2 and g["link_latency_us"] >= 0 and g["link_gbs"] > 0
    assert set(g["seconds"]["all_reduce"]) == {"8", "64", "512", "4096", "32768", "262144", "2097152"}
    check = result["check"]
    assert check["measured_ms_exact_minus_da"] == 10.0 and check["modelled_ms_exact_minus_da_collectives"] > 0
