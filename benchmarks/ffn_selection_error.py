"""How well each FFN selection rule keeps the FFN's output, on a real model's decode-time inputs:
the int4 proxy's |act(gate) * up| estimate (the recommended rule), the exact gate's |act(gate)| (reads
a third of the FFN densely, then only the selected neurons' up and down rows), and the oracle (the
exact |act(gate) * up|). Reported: the mean relative error ||y_sparse - y|| / ||y|| over layers and
decoded tokens, at densities 0.6, 0.5 and 0.4.

The FFN inputs are those of 64 tokens the patched model samples (temperature 0.8) after a prompt.

    .venv/bin/python benchmarks/ffn_selection_error.py --model smollm2-135m   # ~1 min
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from hire import native
from hire.calibrate.prepare import prepare_model
from hire.patch import hire_layers, sparsify_
from hire.recommended import recommended_config
from hire.topk import select_neurons

PROMPT = "The history of the Roman empire is long and complicated, and historians have argued"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    config = recommended_config(args.model)
    model, tokenizer, head_proxy = prepare_model(args.model, config, seq_len=512, calib_windows=16, progress=False)[:3]
    sparsify_(model, config, head_proxy=head_proxy)
    ffns = hire_layers(model)[1]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ffns))}

    def capture(i):
        def hook(module, args):
            if args[0].shape[-2] == 1:  # decode steps only (one new token)
                inputs[i].append(args[0].detach().reshape(1, -1).clone())
        return hook

    hooks = [ffn.register_forward_pre_hook(capture(i)) for i, ffn in enumerate(ffns)]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(1)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=args.tokens, do_sample=True, temperature=0.8, top_k=0)
    for hook in hooks:
        hook.remove()
    report = {"model": args.model, "tokens": args.tokens, "relative_error": {}}
    with torch.no_grad():
        for density in (0.6, 0.5, 0.4):
            errors: dict[str, list[float]] = {"int4_proxy": [], "exact_gate": [], "oracle": []}
            for i, ffn in enumerate(ffns):
                w, m = ffn.weights, ffn.proxy.matrix
                keep = round(density * w.neurons)
                for x in inputs[i]:
                    gate, up = F.linear(x, w.w_in)[0], F.linear(x, w.w_up)[0]
                    a = w.act(gate) * up
                    y = a @ w.w_out_t
                    chosen = {
                        "int4_proxy": select_neurons(native.int4_estimates(x, m.packed, m.scales, m.group_size, 2,
                                                                           native.activation_name(w.act)), keep),
                        "exact_gate": select_neurons(w.act(gate).abs(), keep),
                        "oracle": select_neurons(a.abs(), keep),
                    }
                    for rule, idx in chosen.items():
                        errors[rule].append(((a[idx] @ w.w_out_t[idx] - y).norm() / y.norm()).item())
            report["relative_error"][str(density)] = {rule: sum(v) / len(v) for rule, v in errors.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
