"""`hire scaling`: model tensor-parallel tokens/s for P = 1..64 devices, 1B-70B models."""

from __future__ import annotations

import argparse
import json

from hire.commands._args import add_force, add_json, integer, integers, names, number
from hire.distributed.scaling import MODELS, scaling_report

HELP = "model tensor-parallel tokens/s for P = 1..64 devices, 1B-70B models"
DESCRIPTION = ("Fit gloo's all-reduce / all-gather latency and bandwidth on this machine (--tp ranks, launched with "
               "torchrun), then model decode tokens/s of dense, exact global top-k and DA-TOP-k for P devices and "
               "Llama-shaped 1B-70B models on NVLink- and ICI-class hardware (their bandwidths and latencies are "
               "inputs, see --help of the flags). --measured BENCH.json compares the fitted collective costs with a "
               "`hire bench --tp P --json` run.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=integer(minimum=1), default=2, help="ranks for fitting gloo here, >= 2 unless --no-measure (default 2)")
    p.add_argument("--no-measure", action="store_true", help="skip fitting gloo; model only")
    p.add_argument("--repeats", type=integer(minimum=1), default=30, help="timed repeats per message size (default 30)")
    p.add_argument("--timeout", type=number(above=0), default=300.0, help="seconds a collective may wait (default 300)")
    p.add_argument("--measured", help="a `hire bench --tp P --json` result to check the fitted model against")
    p.add_argument("--devices", type=integers(minimum=1), default=(1, 2, 4, 8, 16, 32, 64),
                   help="device counts to model, comma-separated (default 1,2,4,...,64)")
    p.add_argument("--models", type=names(tuple(MODELS)), default=tuple(MODELS),
                   help=f"model sizes to model (default {','.join(MODELS)})")
    p.add_argument("--mem-gbs", type=number(above=0), default=None, help="add a 'custom' device: weight-read GB/s per device")
    p.add_argument("--link-latency-us", type=number(minimum=0), default=None,
                   help="custom device: latency per collective phase, us")
    p.add_argument("--link-gbs", type=number(above=0), default=None, help="custom device: link GB/s per device")
    p.add_argument("--out", help="write the whole result (table, fit, assumptions) as JSON")
    p.add_argument("--plot", help="write a PNG of tokens/s vs P")
    add_force(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    custom = {"mem_gbs": args.mem_gbs, "link_latency_us": args.link_latency_us, "link_gbs": args.link_gbs}
    r = scaling_report(args.argv, models=args.models, devices=args.devices, custom=custom, measure=not args.no_measure,
                       tp=args.tp, repeats=args.repeats, timeout=args.timeout, measured=args.measured, out=args.out,
                       plot=args.plot, force=args.force)
    if isinstance(r, int):  # the launcher (rank 0 printed) or a rank other than 0
        return r
    print(json.dumps(r, indent=2) if args.json else format_scaling(r, args.devices))
    return 0


def format_scaling(r: dict, devices) -> str:
    lines = []
    if "measured_gloo" in r:
        g = r["measured_gloo"]
        lines.append(f"measured here (gloo, {g['ranks']} ranks): all-reduce {g['fits']['all_reduce']['intercept_us']:.0f} us "
                     f"+ {g['fits']['all_reduce']['us_per_kib']:.2f} us/KiB, all-gather "
                     f"{g['fits']['all_gather']['intercept_us']:.0f} us + {g['fits']['all_gather']['us_per_kib']:.2f} us/KiB "
                     f"-> latency {g['link_latency_us']:.1f} us/phase, {g['link_gbs']:.2f} GB/s")
    if "check" in r:
        c = r["check"]
        lines.append(f"check on {c['model']} at P={c['tp']}: " + ", ".join(
            f"{mode} {m['measured_ms_per_token']:.1f} ms/token measured, {m['modelled_ms_collectives']:.1f} ms of it "
            f"collectives (modelled)" for mode, m in c["modes"].items()))
        if "effective_ms_per_collective" in c:
            lines.append(f"  in the decode loop a collective costs {c['effective_ms_per_collective']:.2f} ms (dense step minus "
                         f"1/{c['tp']} of the one-process step, over its collectives), waiting for the other rank included")
        if "measured_ms_exact_minus_da" in c:
            lines.append(f"  exact - DA: {c['measured_ms_exact_minus_da']:.1f} ms/token measured, "
                         f"{c['modelled_ms_exact_minus_da_collectives']:.1f} ms modelled for the selection collectives")
    lines.append("modelled tokens/s (dense / exact / DA-TOP-k):")
    shown = [p for p in devices if p in (1, 8, 64)] or list(devices)
    lines.append(f"{'hardware':8s} {'model':5s} " + " ".join(f"{'P=' + str(p):>22s}" for p in shown))
    for hw in r["hardware"]:
        for model in r["models"]:
            cells = []
            for p in shown:
                t = {row["mode"]: row["tokens_per_s"] for row in r["table"]
                     if row["hardware"] == hw and row["model"] == model and row["devices"] == p}
                cells.append(f"{t['dense']:6.0f} /{t['exact']:6.0f} /{t['da']:6.0f}")
            lines.append(f"{hw:8s} {model:5s} " + " ".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)
