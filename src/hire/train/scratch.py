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

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from hire.calibrate import proxy_meta, save_head_proxy
from hire.config import FFNConfig, HeadConfig, HiReConfig, check_field_types, config_from_dict, config_to_dict, setting
from hire.data import load_corpus
from hire.engine import Engine
from hire.errors import ConfigError
from hire.files import atomic_files, atomic_path, atomic_write_json
from hire.layers.topk_ffn import apply_topk_, check_topk, topk_mlps
from hire.plots import save_lines
from hire.topk import recall_at_k
from hire.train.joint_proxy import HeadInputs, HeadProxyFactors
from hire.train.tokenizer import encode, load_tokenizer, train_tokenizer

FILES = ("train_config.json", "checkpoint.pt")  # what makes a directory a (resumable) run
SAMPLE_PROMPT = "KING HENRY. Now, lords, "


@dataclass(frozen=True)
class TrainConfig:
    """A from-scratch run. ``density < 1`` trains top-k FFNs; ``head_rank > 0`` trains HiRE-LR.
    Frozen: change it with ``dataclasses.replace``, which validates the result."""

    vocab_size: int = setting(8192, "byte-level BPE vocabulary trained on the corpus")
    hidden_size: int = setting(256, "model width")
    intermediate_size: int = setting(1024, "FFN neurons per layer")
    layers: int = setting(4, "decoder layers")
    heads: int = setting(4, "attention heads (hidden_size / heads must be even)")
    seq_len: int = setting(256, "tokens per training window")
    batch_size: int = setting(16, "windows per step")
    steps: int = setting(300, "optimizer steps")
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int = setting(30, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = setting(0.1, "cosine decay from lr to lr x min_lr_ratio")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    density: float = setting(1.0, "fraction of FFN neurons kept per token (1 = dense, 0.1 = top-10%)")
    group_size: int = setting(1, "contiguous neurons selected together (group top-k)")
    density_warmup: float = setting(0.2, "fraction of the steps over which the density anneals from 1 to its target")
    head_rank: int = setting(0, "> 0: train a rank-r LM-head proxy jointly (HiRE-LR)")
    head_k: int = setting(50, "top-k the head proxy is measured for")
    head_candidates: int = setting(256, "k' of the head proxy")
    head_temperature: float = setting(3.0, "temperature of the head proxy's KL loss")
    head_lr: float = setting(2e-3, "head proxy learning rate, relative to each factor's RMS")
    head_batch: int = setting(512, "head inputs per step for the proxy loss")
    head_refit_every: int = setting(50, "refit the proxy activation-aware every N steps (0 = never)")
    decode_oversample: float = setting(2.0, "FFN candidates / kept neurons in the written HiRE config")
    seed: int = setting(0, "seed of the initial weights and the batches")
    eval_every: int = setting(50, "steps between validation losses")
    eval_windows: int = setting(16, "validation windows")
    save_every: int = setting(100, "steps between checkpoints")

    def __post_init__(self) -> None:
        check_field_types(self)

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

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

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "TrainConfig":
        """A config from JSON-shaped data; ConfigError naming the field for a wrong key, type or value."""
        return config_from_dict(cls, data, what="a train config")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """A run's saved ``train_config.json``; errors name the file."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err


# --- the model, its optimizer and the schedules ------------------------------------------------------------


def build_model(cfg: TrainConfig, tokenizer) -> nn.Module:
    """A Llama-layout decoder with tied embeddings, initialised from ``cfg.seed``."""
    # imported here: transformers takes seconds to import, and `hire --help` imports this module
    # (its flags come from TrainConfig)
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


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms' gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


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


# --- the jointly trained head proxy ------------------------------------------------------------------------


def head_proxy_step(proxy: HeadProxyFactors, cfg: TrainConfig, step: int, h: torch.Tensor,
                    head_weight: torch.Tensor) -> float:
    """Train the proxy on this step's head inputs ``h`` (N, D) against the just-updated head."""
    if cfg.head_refit_every and (step + 1) % cfg.head_refit_every == 0 and h.shape[0] >= cfg.hidden_size:
        proxy.refit(head_weight, h)  # the embedding moves fast early on: re-anchor the proxy on the current head
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)  # a function of the step: resumable
    h = h[torch.randperm(h.shape[0], generator=gen)[: cfg.head_batch]]
    return proxy.learn(h, head_weight, cfg.head_temperature)


# --- validation ------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: nn.Module, windows: torch.Tensor, proxy: HeadProxyFactors | None = None, k: int = 50,
             candidates: int = 256) -> dict:
    """Mean next-token loss on ``windows`` (W, T) and, with a proxy, its recall@1 / @k at ``candidates``."""
    was_training = model.training
    model.eval()
    head_inputs = HeadInputs(model)
    nll, count, r1, rk = 0.0, 0, [], []
    try:
        for w in windows.split(4):
            logits = model(input_ids=w, use_cache=False).logits  # (w, T, V)
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            count += w[:, 1:].numel()
            if proxy is not None:
                true = logits.flatten(0, 1).topk(k, dim=-1).indices  # (w * T, k)
                cand = proxy.scores(head_inputs.value.flatten(0, 1)).topk(candidates, dim=-1).indices
                r1.append(recall_at_k(true[:, :1], cand))
                rk.append(recall_at_k(true, cand))
    finally:
        head_inputs.remove()
        model.train(was_training)
    out = {"val_loss": nll / count}
    if proxy is not None:
        out.update(head_recall_at_1=torch.cat(r1).mean().item(), head_recall_at_k=torch.cat(rk).mean().item())
    return out


def new_log() -> dict[str, Any]:
    """The run's log: per step, per validation, and the training seconds (kept in the checkpoint)."""
    return {"step": [], "loss": [], "lr": [], "density": [], "proxy_loss": [], "val_step": [], "val_loss": [],
            "val_head_recall_at_1": [], "val_head_recall_at_k": [], "seconds": 0.0}


def evaluate(cfg: TrainConfig, model: nn.Module, val_windows: torch.Tensor, proxy: HeadProxyFactors | None,
             log: dict, step: int) -> dict:
    """Validate after ``step`` steps and append the result to ``log``."""
    result = validate(model, val_windows, proxy, k=cfg.head_k, candidates=cfg.head_candidates)
    log["val_step"].append(step)
    log["val_loss"].append(result["val_loss"])
    log["val_head_recall_at_1"].append(result.get("head_recall_at_1"))
    log["val_head_recall_at_k"].append(result.get("head_recall_at_k"))
    return result


# --- the run directory: checks, data, checkpoints ----------------------------------------------------------


def check_run_dir(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """A new run needs a directory without one; a resumed run its checkpoint and the same settings."""
    if resume:
        missing = [name for name in FILES if not (out / name).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot resume: {out} has no {', '.join(missing)}; start a new run without --resume")
        saved = TrainConfig.load(out / "train_config.json")
        if saved != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v}
            raise ValueError(f"cannot resume {out}: its run used different settings (saved, given): {diff}")
    elif out.exists() and any((out / name).exists() for name in FILES):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")


def token_data(cfg: TrainConfig, tokenizer, train_text: str, val_text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training text as one id stream and the first ``eval_windows`` validation windows.
    # -> ids: (N,), val_windows: (W, T)"""
    ids = encode(tokenizer, train_text)
    if ids.numel() < cfg.seq_len + 2:
        raise ValueError(f"training text has {ids.numel()} tokens, fewer than one window of {cfg.seq_len + 1}")
    val_ids = encode(tokenizer, val_text)
    n_val = min(cfg.eval_windows, val_ids.numel() // cfg.seq_len)
    if n_val == 0:
        raise ValueError(f"validation text has {val_ids.numel()} tokens, fewer than one window of {cfg.seq_len}")
    return ids, val_ids[: n_val * cfg.seq_len].view(n_val, cfg.seq_len)


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, proxy: HeadProxyFactors | None,
                    step: int, log: dict) -> None:
    """Everything a resumed run needs, written atomically (a crash leaves the previous checkpoint)."""
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}
    if proxy is not None:
        state.update(proxy.state_dict())
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    proxy: HeadProxyFactors | None) -> tuple[int, dict]:
    """Restore the model, optimizers and proxy in place; returns (steps done, log)."""
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if proxy is not None:
        proxy.load_state_dict(state)
    return int(state["step"]), state["log"]


# --- the training loop -------------------------------------------------------------------------------------


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
    check_run_dir(cfg, out, resume)
    if train_text is None or val_text is None:
        corpus = load_corpus()
        train_text = corpus.text("calibration") if train_text is None else train_text
        val_text = corpus.text("evaluation") if val_text is None else val_text
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = train_tokenizer(train_text, cfg.vocab_size)
        with atomic_files(out) as tmp:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(out / "train_config.json", cfg.to_dict())
    ids, val_windows = token_data(cfg, tokenizer, train_text, val_text)

    model = build_model(cfg, tokenizer)
    opt = build_optimizer(cfg, model)
    head_weight = model.get_output_embeddings().weight  # (V, D), tied to the embedding: the proxy chases it
    proxy = HeadProxyFactors.fit(head_weight, cfg.head_rank, cfg.head_lr) if cfg.head_rank else None
    start, log = load_checkpoint(out / "checkpoint.pt", model, opt, proxy) if resume else (0, new_log())
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

    mlps = topk_mlps(model)
    head_inputs = HeadInputs(model) if proxy is not None else None
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {cfg.variant}", disable=not progress)
    try:
        for step in bar:
            # every quantity of a step is a function of the step number: a resumed run replays it exactly
            density, lr = density_at(cfg, step), lr_at(cfg, step)
            for mlp in mlps:
                mlp.set_density(density)
            for group in opt.param_groups:
                group["lr"] = lr
            x = batch_at(ids, cfg, step)  # (B, T + 1)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            proxy_loss = None
            if proxy is not None:  # after the model's step: the proxy follows the updated head
                proxy_loss = head_proxy_step(proxy, cfg, step, head_inputs.value.detach().flatten(0, 1), head_weight)

            log["step"].append(step + 1)
            log["loss"].append(loss.item())
            log["lr"].append(lr)
            log["density"].append(density)
            log["proxy_loss"].append(proxy_loss)
            postfix = {"loss": f"{log['loss'][-1]:.3f}"}
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                postfix["val"] = f"{evaluate(cfg, model, val_windows, proxy, log, step + 1)['val_loss']:.3f}"
            bar.set_postfix(postfix)
            if (step + 1) % cfg.save_every == 0 and step + 1 < end:
                log["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint(out / "checkpoint.pt", model, opt, proxy, step + 1, log)
    finally:
        bar.close()
        if head_inputs is not None:
            head_inputs.remove()
    log["seconds"] += time.perf_counter() - t0
    if end < cfg.steps:
        save_checkpoint(out / "checkpoint.pt", model, opt, proxy, end, log)
        return {"stopped_at": end, "steps": cfg.steps, "out": str(out)}
    final = evaluate(cfg, model, val_windows, proxy, log, cfg.steps)
    # the finished state too: a crash while exporting is recovered by --resume (no steps left, export again)
    save_checkpoint(out / "checkpoint.pt", model, opt, proxy, cfg.steps, log)
    return export(cfg, out, model, tokenizer, log, final, proxy)


# --- the finished run --------------------------------------------------------------------------------------


def decode_config(cfg: TrainConfig) -> HiReConfig:
    """How HiRE decodes the trained model: FFN int4 proxy over-selecting ``decode_oversample`` x the
    trained density, exact on the candidates; the jointly trained head proxy when there is one."""
    head = HeadConfig(enabled=cfg.head_rank > 0, proxy="lowrank", rank=cfg.head_rank or min(64, cfg.hidden_size),
                      rank_bits=8, k=cfg.head_k, candidates=cfg.head_candidates,
                      proxy_file="head_proxy.safetensors" if cfg.head_rank else "")
    ffn = FFNConfig(enabled=cfg.density < 1.0, density=cfg.density, oversample=cfg.decode_oversample,
                    proxy="int4", group_size=cfg.group_size)
    return HiReConfig(head=head, ffn=ffn)


def hire_greedy(model: nn.Module, tokenizer, config: HiReConfig, head_proxy=None, prompt: str = SAMPLE_PROMPT,
                tokens: int = 24) -> list[int]:
    """Greedy token ids from the HiRE engine (float32) over ``model`` patched with ``config``.
    Patches ``model`` in place (the engine's way); call it last."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
    engine = Engine(model, config, head_proxy=head_proxy, dtype=torch.float32, max_seq_len=ids.numel() + tokens + 1)
    return engine.generate(ids, tokens, hire=True).token_ids


def plot_loss(log: dict, path: Path, title: str) -> None:
    series = [{"x": log["step"], "y": log["loss"], "label": "train", "style": {"lw": 0.6, "alpha": 0.6}}]
    if log["val_step"]:
        series.append({"x": log["val_step"], "y": log["val_loss"], "label": "validation", "style": {"marker": "o", "ms": 3}})
    save_lines(path, series, xlabel="step", ylabel="next-token loss (nats)", title=title)


def export(cfg: TrainConfig, out: Path, model: nn.Module, tokenizer, log: dict, final: dict,
           proxy: HeadProxyFactors | None) -> dict:
    """Write the finished run: the model directory, its HiRE config, head proxy, log and plot."""
    model.eval()
    config = decode_config(cfg)
    for mlp in topk_mlps(model):
        mlp.set_density(cfg.density)
    with atomic_files(out) as tmp:  # the run directory keeps its checkpoint: each file replaced whole
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    head_proxy = None
    if proxy is not None:
        head_proxy = proxy.export()
        save_head_proxy(out / "head_proxy.safetensors", head_proxy, proxy_meta(model, config.head))
    config.save(out / "hire_config.json")
    summary = {
        "variant": cfg.variant,
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
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
    plot_loss(log, out / "loss.png", f"{cfg.variant}: val loss {final['val_loss']:.3f}")
    sample = hire_greedy(model, tokenizer, config, head_proxy)  # last: the engine patches the model
    summary["hire_greedy_sample"] = {"prompt": SAMPLE_PROMPT, "token_ids": sample, "text": tokenizer.decode(sample)}
    atomic_write_json(out / "train_log.json", {"summary": summary, "config": cfg.to_dict(), "log": log})
    return summary
