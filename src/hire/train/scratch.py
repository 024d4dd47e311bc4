"""`hire train`: a small Llama-layout decoder trained from scratch on the corpus, dense or with
top-k FFNs (single neurons or contiguous groups), optionally with its low-rank LM-head proxy
(HiRE-LR) trained jointly.

The run directory is an ordinary Hugging Face model directory (``model.safetensors``,
``config.json`` with ``hire_topk`` for top-k models, the tokenizer) plus ``hire_config.json``
(how HiRE decodes it: the FFN proxy over-selects, exact activations on the candidates, and the
jointly trained head proxy), ``head_proxy.safetensors``, ``checkpoint.pt`` (model, optimizers,
step: ``--resume`` continues from it and ends where an uninterrupted run ends),
``train_config.json``, ``train_log.json`` and ``loss.png``.

Determinism: the initial weights come from ``seed``; the batch of step s from a generator seeded
by (seed, s); the learning rate and the annealed density are functions of s. A resumed run
therefore replays exactly what the interrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from hire.calibrate.train import rms_adam
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.layers.topk_ffn import apply_topk_, check_topk, topk_mlps
from hire.proxies import LowRankProxy
from hire.train.tokenizer import encode, load_tokenizer, train_tokenizer

FILES = ("train_config.json", "checkpoint.pt")


@dataclass
class TrainConfig:
    """A from-scratch run. ``density < 1`` trains top-k FFNs; ``head_rank > 0`` trains HiRE-LR."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.1
    density: float = 1.0  # fraction of FFN neurons kept per token (1 = dense)
    group_size: int = 1  # contiguous neurons selected together
    density_warmup: float = 0.2  # fraction of the steps over which the density anneals from 1 to its target
    head_rank: int = 0  # > 0: train a rank-r LM-head proxy jointly (KL to the model's distribution)
    head_k: int = 50
    head_candidates: int = 256
    head_temperature: float = 3.0
    head_lr: float = 2e-3  # relative to each factor's RMS
    head_batch: int = 512  # head inputs per step for the proxy loss
    head_refit_every: int = 50  # refit the proxy activation-aware on the batch's head inputs every N steps (0 = never)
    decode_oversample: float = 2.0  # FFN candidates / kept neurons in the written HiRE config
    seed: int = 0
    eval_every: int = 50
    eval_windows: int = 16
    save_every: int = 100

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "seq_len", "batch_size",
                     "steps", "head_k", "head_candidates", "head_batch", "eval_every", "eval_windows", "save_every"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.hidden_size % self.heads == 0 and (self.hidden_size // self.heads) % 2 == 0,
              f"hidden_size {self.hidden_size} must split into {self.heads} heads of an even width")
        check_topk(self.intermediate_size, self.density, self.group_size)
        check(0.0 <= self.density_warmup <= 1.0, f"density_warmup must be in [0, 1], got {self.density_warmup}")
        check(self.lr > 0 and self.head_lr > 0, "learning rates must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.warmup_steps < self.steps or self.steps == 1,
              f"warmup_steps must be in [0, steps), got {self.warmup_steps} with {self.steps} steps")
        check(0 <= self.head_rank <= self.hidden_size, f"head_rank must be in [0, hidden_size], got {self.head_rank}")
        check(self.head_k <= self.head_candidates <= self.vocab_size,
              f"need head_k <= head_candidates <= vocab_size, got {self.head_k}, {self.head_candidates}, {self.vocab_size}")
        check(self.head_temperature > 0, "head_temperature must be > 0")
        check(self.head_refit_every >= 0, f"head_refit_every must be >= 0, got {self.head_refit_every}")
        check(self.decode_oversample >= 1.0, f"decode_oversample must be >= 1, got {self.decode_oversample}")

    @property
    def variant(self) -> str:
        if self.density >= 1.0:
            name = "dense"
        else:
            name = "top-k" if self.group_size == 1 else f"group top-k (groups of {self.group_size})"
        return name + (f" + HiRE-LR head (rank {self.head_rank})" if self.head_rank else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        return cls(**data)


def build_model(cfg: TrainConfig, tokenizer) -> nn.Module:
    """A Llama-layout decoder with tied embeddings, initialised from ``cfg.seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but the config says vocab_size={cfg.vocab_size}")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=max(2048, cfg.seq_len), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    if cfg.density < 1.0:
        apply_topk_(model, cfg.density, cfg.group_size)
    return model


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def density_at(cfg: TrainConfig, step: int) -> float:
    """Kept fraction at ``step``: 1 at the start, linear to the target over ``density_warmup``."""
    ramp = cfg.density_warmup * cfg.steps
    if ramp <= 0 or step >= ramp:
        return cfg.density
    return 1.0 - (1.0 - cfg.density) * step / ramp


def batch_at(ids: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """The batch of ``step``: random windows of seq_len + 1 tokens. # -> (B, T + 1)"""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return ids[starts[:, None] + torch.arange(cfg.seq_len + 1)]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class _HeadInputs:
    """Captures the LM head's input during a forward pass."""

    def __init__(self, model: nn.Module):
        self.value = None
        self._hook = model.get_output_embeddings().register_forward_hook(self._grab)

    def _grab(self, module, args, out):
        self.value = args[0]

    def remove(self) -> None:
        self._hook.remove()


@torch.no_grad()
def validate(model: nn.Module, windows: torch.Tensor, proxy=None, k: int = 50, candidates: int = 256) -> dict:
    """Mean next-token loss on ``windows`` (W, T) and, with a proxy (u, v), its recall@1 / @k."""
    from hire.topk import recall_at_k

    was_training = model.training
    model.eval()
    grab = _HeadInputs(model)
    nll, count, r1, rk = 0.0, 0, [], []
    try:
        for w in windows.split(4):
            logits = model(input_ids=w, use_cache=False).logits
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            count += w[:, 1:].numel()
            if proxy is not None:
                u, v = proxy
                h = grab.value.flatten(0, 1)
                true = logits.flatten(0, 1).topk(k, dim=-1).indices
                cand = ((h @ v.t()) @ u.t()).topk(candidates, dim=-1).indices
                r1.append(recall_at_k(true[:, :1], cand))
                rk.append(recall_at_k(true, cand))
    finally:
        grab.remove()
        model.train(was_training)
    out = {"val_loss": nll / count}
    if proxy is not None:
        out.update(head_recall_at_1=torch.cat(r1).mean().item(), head_recall_at_k=torch.cat(rk).mean().item())
    return out


def _decode_config(cfg: TrainConfig) -> HiReConfig:
    """How HiRE decodes the trained model: FFN int4 proxy over-selecting ``decode_oversample`` x the
    trained density, exact on the candidates; the jointly trained head proxy when there is one."""
    head = HeadConfig(enabled=cfg.head_rank > 0, proxy="lowrank", rank=cfg.head_rank or min(64, cfg.hidden_size),
                      rank_bits=8, k=cfg.head_k, candidates=cfg.head_candidates,
                      proxy_file="head_proxy.safetensors" if cfg.head_rank else "")
    ffn = FFNConfig(enabled=cfg.density < 1.0, density=cfg.density, oversample=cfg.decode_oversample,
                    proxy="int4", group_size=cfg.group_size)
    return HiReConfig(head=head, ffn=ffn)


SAMPLE_PROMPT = "KING HENRY. Now, lords, "


def hire_greedy(model: nn.Module, tokenizer, config: HiReConfig, head_proxy=None, prompt: str = SAMPLE_PROMPT,
                tokens: int = 24) -> list[int]:
    """Greedy token ids from the HiRE engine (float32) over ``model`` patched with ``config``.
    Patches ``model`` in place (the engine's way); call it last."""
    from hire.engine import Engine

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
    engine = Engine(model, config, head_proxy=head_proxy, dtype=torch.float32, max_seq_len=ids.numel() + tokens + 1)
    return engine.generate(ids, tokens, hire=True).token_ids


def _plot(log: dict, path: Path, title: str) -> None:
    from hire.plots import save_lines

    series = [{"x": log["step"], "y": log["loss"], "label": "train", "style": {"lw": 0.6, "alpha": 0.6}}]
    if log["val_step"]:
        series.append({"x": log["val_step"], "y": log["val_loss"], "label": "validation", "style": {"marker": "o", "ms": 3}})
    save_lines(path, series, xlabel="step", ylabel="next-token loss (nats)", title=title)


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    train_text: str | None = None,
    val_text: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) a run in ``out``; returns its summary (also written to train_log.json).

    ``train_text`` / ``val_text`` default to the corpus's calibration / evaluation splits.
    ``stop_after`` ends the run early after that many steps, with a checkpoint (as an interrupted
    run would leave it); ``resume=True`` continues it.
    """
    out = Path(out)
    if resume:
        missing = [name for name in FILES if not (out / name).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot resume: {out} has no {', '.join(missing)}; start a new run without --resume")
        saved = TrainConfig.from_dict(json.loads((out / "train_config.json").read_text()))
        if saved != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v}
            raise ValueError(f"cannot resume {out}: its run used different settings (saved, given): {diff}")
    elif out.exists() and any((out / name).exists() for name in FILES):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if train_text is None or val_text is None:
        from hire.data import load_corpus

        corpus = load_corpus()
        train_text = corpus.text("calibration") if train_text is None else train_text
        val_text = corpus.text("evaluation") if val_text is None else val_text
    out.mkdir(parents=True, exist_ok=True)

    if resume:
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = train_tokenizer(train_text, cfg.vocab_size)
        tokenizer.save_pretrained(str(out))
        _write_json(out / "train_config.json", cfg.to_dict())
    ids = encode(tokenizer, train_text)
    if ids.numel() < cfg.seq_len + 2:
        raise ValueError(f"training text has {ids.numel()} tokens, fewer than one window of {cfg.seq_len + 1}")
    val_ids = encode(tokenizer, val_text)
    n_val = min(cfg.eval_windows, val_ids.numel() // cfg.seq_len)
    if n_val == 0:
        raise ValueError(f"validation text has {val_ids.numel()} tokens, fewer than one window of {cfg.seq_len}")
    val_windows = val_ids[: n_val * cfg.seq_len].view(n_val, cfg.seq_len)

    model = build_model(cfg, tokenizer)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    head_w = model.get_output_embeddings().weight
    proxy = popt = None
    if cfg.head_rank:

        init = LowRankProxy.from_weight(head_w.detach(), cfg.head_rank, u_bits=16)
        proxy = (init.u.float().requires_grad_(True), init.v.float().requires_grad_(True))
        popt = rms_adam(list(proxy), cfg.head_lr)
    log = {"step": [], "loss": [], "lr": [], "density": [], "proxy_loss": [], "val_step": [], "val_loss": [],
           "val_head_recall_at_1": [], "val_head_recall_at_k": [], "seconds": 0.0}
    start = 0
    if resume:
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if proxy is not None:
            with torch.no_grad():
                proxy[0].copy_(state["proxy_u"])
                proxy[1].copy_(state["proxy_v"])
            popt.load_state_dict(state["proxy_opt"])
        log, start = state["log"], int(state["step"])

    def checkpoint(step: int) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}
        if proxy is not None:
            state.update(proxy_u=proxy[0].detach(), proxy_v=proxy[1].detach(), proxy_opt=popt.state_dict())
        _atomic_save(state, out / "checkpoint.pt")

    def evaluate(step: int) -> dict:
        v = validate(model, val_windows, proxy=None if proxy is None else tuple(p.detach() for p in proxy),
                     k=cfg.head_k, candidates=cfg.head_candidates)
        log["val_step"].append(step)
        log["val_loss"].append(v["val_loss"])
        log["val_head_recall_at_1"].append(v.get("head_recall_at_1"))
        log["val_head_recall_at_k"].append(v.get("head_recall_at_k"))
        return v

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    mlps = topk_mlps(model)
    grab = _HeadInputs(model) if proxy is not None else None
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {cfg.variant}", disable=not progress)
    try:
        for step in bar:
            density = density_at(cfg, step)
            for m in mlps:
                m.set_density(density)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            x = batch_at(ids, cfg, step)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ploss = None
            if proxy is not None:
                from hire.calibrate.train import proxy_kl_loss

                h = grab.value.detach().flatten(0, 1)
                if cfg.head_refit_every and (step + 1) % cfg.head_refit_every == 0 and h.shape[0] >= cfg.hidden_size:
                    # the embedding moves fast early on: re-anchor the proxy on the current head, activation-aware
                    refit = LowRankProxy.from_weight(head_w.detach(), cfg.head_rank, states=h, u_bits=16)
                    with torch.no_grad():
                        proxy[0].copy_(refit.u.float())
                        proxy[1].copy_(refit.v.float())
                    popt = rms_adam(list(proxy), cfg.head_lr)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)
                h = h[torch.randperm(h.shape[0], generator=gen)[: cfg.head_batch]]
                ploss = proxy_kl_loss(h, head_w, proxy[0], proxy[1], cfg.head_temperature)
                popt.zero_grad(set_to_none=True)
                ploss.backward()
                popt.step()
            log["step"].append(step + 1)
            log["loss"].append(loss.item())
            log["lr"].append(lr)
            log["density"].append(density)
            log["proxy_loss"].append(None if ploss is None else ploss.item())
            post = {"loss": f"{loss.item():.3f}"}
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                post["val"] = f"{evaluate(step + 1)['val_loss']:.3f}"
            bar.set_postfix(post)
            if (step + 1) % cfg.save_every == 0 and step + 1 < end:
                log["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(step + 1)
    finally:
        bar.close()
        if grab is not None:
            grab.remove()
    log["seconds"] += time.perf_counter() - t0
    if end < cfg.steps:
        checkpoint(end)
        return {"stopped_at": end, "steps": cfg.steps, "out": str(out)}
    final = evaluate(cfg.steps)
    checkpoint(cfg.steps)
    return export(cfg, out, model, tokenizer, log, final, proxy)


def export(cfg: TrainConfig, out: Path, model: nn.Module, tokenizer, log: dict, final: dict, proxy) -> dict:
    """Write the finished run: the model directory, its HiRE config, head proxy, log and plot."""
    from hire.calibrate import proxy_meta, save_head_proxy
    from hire.proxies.quantized import QuantizedMatrix

    model.eval()
    config = _decode_config(cfg)
    for m in topk_mlps(model):
        m.set_density(cfg.density)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    head_proxy = None
    if proxy is not None:
        u, v = (p.detach() for p in proxy)
        head_proxy = LowRankProxy(QuantizedMatrix.from_weight(u, bits=8, group_size=cfg.head_rank), v.half())
        save_head_proxy(out / "head_proxy.safetensors", head_proxy, proxy_meta(model, config.head))
    config.save(out / "hire_config.json")
    params = sum(p.numel() for p in model.parameters())
    summary = {
        "variant": cfg.variant,
        "out": str(out),
        "parameters": params,
        "density": cfg.density,
        "group_size": cfg.group_size,
        "head_rank": cfg.head_rank,
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_loss_last50": sum(log["loss"][-50:]) / len(log["loss"][-50:]),
        "val_loss": final["val_loss"],
        "val_ppl": math.exp(final["val_loss"]),
        "val_head_recall_at_1": final.get("head_recall_at_1"),
        "val_head_recall_at_k": final.get("head_recall_at_k"),
        "train_seconds": log["seconds"],
        "hire_config": str(out / "hire_config.json"),
    }
    _plot(log, out / "loss.png", f"{cfg.variant}: val loss {final['val_loss']:.3f}")
    sample = hire_greedy(model, tokenizer, config, head_proxy)  # last: the engine patches the model
    summary["hire_greedy_sample"] = {"prompt": SAMPLE_PROMPT, "token_ids": sample, "text": tokenizer.decode(sample)}
    _write_json(out / "train_log.json", {"summary": summary, "config": cfg.to_dict(), "log": log})
    return summary
