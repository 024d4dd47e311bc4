"""The engine: one decoder implementation over a Hugging Face model's own modules and weights."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from hire import native
from hire.arch import EngineSpec, arch_spec, config_value, decoder_layers, engine_spec
from hire.config import HiReConfig
from hire.engine.plan import LayerPlan, NotFusable, layer_plans, native_steps
from hire.engine.sampling import PROBE_EVERY, DensePolicy, SamplingStats, needs_tail, sample
from hire.engine.weights import fused_qkv, projection, share_ffn_weights
from hire.layers import HiReFFN
from hire.layers.head import LogitMap, TailBound, exact_logits, native_rows_for, soft_cap
from hire.proxies import LowRankProxy
from hire.patch import hire_layers, sparsify_, sparsify_head_
from hire.quant.tensor import QTensor



class _RMSNorm:
    """A Llama or Gemma RMSNorm module as one fused op (torch's rms_norm in float32): the
    module's several elementwise ops per call add up over every layer of every token."""

    def __init__(self, module: nn.Module, spec: EngineSpec):
        self.weight = module.weight.detach().float() + spec.norm_weight_offset  # Gemma scales by (1 + w)
        self.eps = getattr(module, spec.norm_eps)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(dtype or x.dtype)


def _linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for a 16-bit weight, a GGUF-quantized one, or q/k/v quantized apart."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    parts = [w] if isinstance(w, QTensor) else list(w)
    y = torch.cat([q.linear(x).to(x.dtype) if isinstance(q, QTensor) else F.linear(x, q) for q in parts], dim=-1)
    return y if bias is None else y + bias


# a prompt prefills as batched native steps of this many tokens (Engine.prefill). Batched steps against
# the eager prefill, ms (benchmarks/batch_step.py --parts prefill): SmolLM2 codes 8 tokens 11 / 58,
# 32: 26 / 83, 512: 652 / 960; Gemma-3 codes 8: 11 / 70, 512: 516 / 860; SmolLM2 16-bit 8: 19 / 46,
# 512: 1,278 / 2,525. The chunk bounds a step's buffers, not its cost.
PREFILL_CHUNK = 512
NO_ROPE = "no rotary"  # the rotary table of layers without RoPE (EngineSpec.rope_layers)


@dataclass
class _Layer:
    qkv: torch.Tensor | QTensor | tuple  # (Hq*hd + 2*Hkv*hd, D): q, k, v fused into one read (or quantized apart)
    qkv_bias: torch.Tensor | None  # (Hq*hd + 2*Hkv*hd,): Qwen2's q/k/v biases
    o: torch.Tensor | QTensor  # (D, Hq*hd)
    o_bias: torch.Tensor | None  # (D,)
    module: nn.Module  # the HF decoder layer: its (maybe HiRE) FFN
    norms: dict[str, _RMSNorm]  # the layer's norms by their EngineSpec attribute names
    sliding: int | None  # sliding-window length, None for global attention
    rope: int  # which rotary table


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """Decode loop over ``model`` (patched in place with ``config`` unless ``config`` is None).

    Prefill is dense; each decode step runs one token through every layer, with HiRE layers
    taking their sparse path when ``hire=True``. A decode step is one native call
    (``hire.engine.plan``) where the kernels are built and the model's layers allow it
    (``native_reason`` says why not); ``fused=False`` keeps the eager step, the reference.

    The model is converted to ``dtype`` in place and its weights are held once: q, k and v become row
    views of the engine's fused q/k/v, and the native step's dense FFN reads the model's own matrices
    (a float16 HiRE FFN's down is held twice: ``hire.engine.weights.share_ffn_weights``).
    """

    supports_fused = True  # a subclass that replaces the eager step's parts (tensor parallel) sets False

    def __init__(
        self,
        model: nn.Module,
        config: HiReConfig | None = None,
        *,
        head_proxy=None,
        dtype: torch.dtype = torch.float16,
        max_seq_len: int = 1024,
        fused: bool = True,
    ):
        self.spec = spec = engine_spec(model)
        self.mlp = arch_spec(model).mlp
        self.model = model.to(dtype).eval()
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        scale_base = getattr(cfg, spec.attention_scale) if spec.attention_scale else self.head_dim
        self.scale = config_value(cfg, spec.attention_multiplier) or scale_base ** -0.5  # Granite's, where set
        self.attention_softcap = config_value(cfg, spec.attention_softcap)  # Gemma 2: c * tanh(score / c)
        # what the model does to its logits after the head (Gemma 2's cap, Granite's divisor), or None
        self.logit_map = LogitMap.of(model)
        self.embedding_multiplier = config_value(cfg, spec.embedding_multiplier)  # Granite's
        self.residual_multiplier = config_value(cfg, spec.residual_multiplier)
        if config is not None:
            sparsify_(model, config, head_proxy=head_proxy)
        self.config = config
        self.head, self.ffns = hire_layers(model)
        for part in ([self.head] if self.head is not None else []) + self.ffns:
            part.prepare_decode(dtype)
        self.embed = model.get_submodule(spec.embed)
        self.norm = _RMSNorm(model.get_submodule(spec.final_norm), spec)
        head = model.get_output_embeddings()
        # a GGUF-quantized head stays in its codes (head_weight is then its QTensor)
        self.head_weight = projection(head.base_layer if self.head is not None else head)
        self.head_bias = (head.base_layer if self.head is not None else head).bias  # (V,) or None
        self.head_native = native_rows_for(self.head_weight)  # the dense head on the kernels (decided here, as layers do)
        # temperature / top-p sampling past the head's candidates (hire.engine.sampling); False: among
        # the candidates only (the law before exact sampling, kept for comparison)
        self.sample_tail = True
        self.sampling_stats = SamplingStats()
        # generate's DensePolicy: after a step that fell back to the whole head, this many steps until
        # HiRE is probed again (1: probe every step)
        self.probe_every = PROBE_EVERY
        self._build_rope(model.get_submodule(spec.rotary))
        layer_norms = [spec.pre_attention_norm, spec.post_attention_norm, spec.pre_ffn_norm, spec.post_ffn_norm]
        self.layers = []
        for i, layer in enumerate(decoder_layers(model)):
            attn = getattr(layer, spec.attention)
            qkv, qkv_bias = fused_qkv(attn, spec, dtype)  # the model's q, k and v then views of it
            o = getattr(attn, spec.o)
            layer_type = cfg.layer_types[i] if getattr(cfg, "layer_types", None) else "full_attention"
            sliding = cfg.sliding_window if layer_type == "sliding_attention" else None
            rotates = not spec.rope_layers or bool(getattr(cfg, spec.rope_layers)[i])
            norms = {name: _RMSNorm(getattr(layer, name), spec) for name in layer_norms if name is not None}
            for name in spec.qk_norms or ():
                norms[name] = _RMSNorm(getattr(attn, name), spec)
            o_bias = None if o.bias is None else o.bias.detach()
            self.layers.append(
                _Layer(qkv, qkv_bias, projection(o), o_bias, layer, norms, sliding,
                       self.rope_index[layer_type if rotates else NO_ROPE])
            )
        shape = (len(self.layers), self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self._timing: dict[str, float] | None = None  # seconds per part while timed() runs
        self.native_steps, self.native_reason = None, "fused=False"
        self.plans: list[LayerPlan] | None = None  # the layers' decode plans, where the native step runs
        if fused and self.supports_fused and not native.available():
            self.native_reason = f"native kernels unavailable ({native.unavailable_reason()})"
        elif fused and self.supports_fused:
            try:
                plans = layer_plans(self)
            except NotFusable as exc:
                self.native_reason = str(exc)
            else:
                self.native_steps, self.native_reason = native_steps(self, plans=plans)
                self.plans = plans if self.native_steps is not None else None
        if self.plans is not None:
            share_ffn_weights(self)

    # --- set-up ----------------------------------------------------------------------------
    def enable_head(self, config: HiReConfig, head_proxy: LowRankProxy | None = None) -> None:
        """Switch this engine's dense head to ``config.head`` (HiRE) between steps, the rest as it is:
        ``hire serve`` starts with the dense head while the proxy is fitted, then switches
        (hire.serve.background). ``head_proxy``: the fitted low-rank proxy the head config needs."""
        if self.head is not None:
            raise ValueError("the engine's head is a HiRE head already")
        head = sparsify_head_(self.model, config.head, head_proxy=head_proxy)
        head.prepare_decode(self.dtype)
        self.head = head
        self.config = self.model.hire_config

    def _build_rope(self, rotary: nn.Module) -> None:
        """cos/sin for every position, per layer type, computed once by the model's own rotary module."""
        positions = torch.arange(self.max_seq_len).unsqueeze(0)
        probe = torch.zeros(1, 1, dtype=torch.float32)
        types = sorted(set(getattr(self.model.config, "layer_types", None) or ["full_attention"]))
        self.rope_index = {t: i for i, t in enumerate(types)}
        self.rope_tables, self.rope_tables_f32 = [], []
        for t in types:
            cos, sin = rotary(probe, positions, t) if self.spec.rotary_per_layer_type else rotary(probe, positions)
            self.rope_tables.append((cos[0].to(self.dtype), sin[0].to(self.dtype)))  # (L, hd)
            self.rope_tables_f32.append((cos[0].float().contiguous(), sin[0].float().contiguous()))  # the native step's
        if self.spec.rope_layers and not all(getattr(self.model.config, self.spec.rope_layers)):
            # a NoPE layer rotates by nothing: cos 1, sin 0 (x cos + rotate(x) sin is x exactly)
            self.rope_index[NO_ROPE] = len(self.rope_tables)
            ones, zeros = torch.ones(self.max_seq_len, self.head_dim), torch.zeros(self.max_seq_len, self.head_dim)
            self.rope_tables.append((ones.to(self.dtype), zeros.to(self.dtype)))
            self.rope_tables_f32.append((ones, zeros))

    # --- the decoder -----------------------------------------------------------------------
    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (H, T, hd), cos/sin: (T, hd)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def attention_block(self, layer: _Layer, index: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """One layer's attention on the eager step (a hook: the tensor-parallel engine overrides it
        with its heads and a sum over ranks)."""
        # x: (T, D) normalised input, positions start..start+T-1 -> (T, D)
        T = x.shape[0]
        q, k, v = _linear(x, layer.qkv, layer.qkv_bias).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        whole = False  # q and k normalised over all heads at once (OLMo 2), else per head
        if self.spec.qk_norms:
            q_norm, k_norm = (layer.norms[name] for name in self.spec.qk_norms)
            whole = q_norm.weight.numel() == q.shape[-1] and self.n_heads > 1
            if whole:
                q, k = q_norm(q), k_norm(k)
        q = q.reshape(T, self.n_heads, self.head_dim).transpose(0, 1)  # (Hq, T, hd)
        k = k.reshape(T, self.n_kv, self.head_dim).transpose(0, 1)  # (Hkv, T, hd)
        v = v.view(T, self.n_kv, self.head_dim).transpose(0, 1)
        if self.spec.qk_norms and not whole:
            q, k = q_norm(q), k_norm(k)
        cos, sin = self.rope_tables[layer.rope]
        cos, sin = cos[start : start + T], sin[start : start + T]
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        end = start + T
        self.k_cache[index, :, start:end] = k
        self.v_cache[index, :, start:end] = v
        first = 0 if layer.sliding is None else max(0, end - layer.sliding - T + 1)
        keys, values = self.k_cache[index, :, first:end], self.v_cache[index, :, first:end]  # (Hkv, S, hd)
        if T == 1:
            mask = None
        else:  # causal (and sliding) mask over the keys first..end-1 for queries start..end-1
            qpos = torch.arange(start, end).unsqueeze(1)
            kpos = torch.arange(first, end).unsqueeze(0)
            mask = kpos <= qpos
            if layer.sliding is not None:
                mask &= qpos - kpos < layer.sliding
        if self.attention_softcap:  # the scores capped before the mask and the softmax (transformers' Gemma 2)
            group = self.n_heads // self.n_kv
            scores = q @ keys.repeat_interleave(group, 0).transpose(1, 2) * self.scale  # (Hq, T, S)
            scores = soft_cap(scores, self.attention_softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
            out = (weights @ values.repeat_interleave(group, 0)).unsqueeze(0)  # (1, Hq, T, hd)
        else:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=self.scale, enable_gqa=True
            )  # (1, Hq, T, hd)
        return _linear(out[0].transpose(0, 1).reshape(T, -1), layer.o, layer.o_bias)

    def ffn_block(self, layer: nn.Module, x: torch.Tensor, hire: bool) -> torch.Tensor:
        mlp = getattr(layer, self.mlp)
        if isinstance(mlp, HiReFFN):
            return mlp.decode(x) if hire and x.shape[0] == 1 else mlp.base_layer(x)
        return mlp(x)

    @contextmanager
    def using_cache(self, k: torch.Tensor, v: torch.Tensor) -> Iterator[None]:
        """The eager path reads and writes ``k``/``v`` (L, Hkv, S, hd) while the block runs (a batch
        slot's cache, hire.engine.batch); the native step keeps the engine's own."""
        if k.shape != self.k_cache.shape or v.shape != self.v_cache.shape:
            raise ValueError(f"a cache must be {tuple(self.k_cache.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
        saved = self.k_cache, self.v_cache
        self.k_cache, self.v_cache = k, v
        try:
            yield
        finally:
            self.k_cache, self.v_cache = saved

    # --- timing hooks ----------------------------------------------------------------------
    @contextmanager
    def timed(self) -> Iterator[dict[str, float]]:
        """Seconds spent in attention, the FFNs and the head while the block runs, by part (the
        CPU runs operators synchronously, so a clock around a part is its cost). The native step
        times its parts itself. Timing costs a clock read per part per layer."""
        spent: dict[str, float] = defaultdict(float)
        self._timing = spent
        for step in (self.native_steps or {}).values():
            step.set_timing(True)
        try:
            yield spent
        finally:
            self._timing = None
            for step in (self.native_steps or {}).values():
                attention, ffn, proxy, select = step.timings()
                spent["attention"] += attention
                spent["ffn"] += ffn
                if proxy or select:  # parts of the FFN's time, where a fused proxy ran
                    spent["ffn_proxy"] += proxy
                    spent["ffn_select"] += select
                step.set_timing(False)

    def _clock(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self._timing[part] += now - since
        return now

    # --- the decoder -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start: int, hire: bool) -> torch.Tensor:
        """Final hidden state of the last position.  # tokens: (T,) -> (1, D)

        The residual stream stays in float32 (Gemma's overflows float16); every weight product
        runs in the engine's 16-bit dtype on normalised inputs. One token runs the native step
        when there is one.
        """
        h = self.embed_tokens(tokens)  # (T, D)
        if self.native_steps is not None and tokens.numel() == 1:
            return self.native_steps[hire].step(h, start).to(self.dtype)
        return self.eager_forward(h, start, hire)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: the embeddings (Gemma's modules apply their sqrt(D) scale
        themselves), times Granite's multiplier in their dtype as the model does, in float32.
        # tokens: (T,) -> (T, D)"""
        e = self.embed(tokens)
        return (e * self.embedding_multiplier if self.embedding_multiplier else e).float()

    def prefill(self, prompt: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor] | None = None,
                slot: int = 0, start: int = 0) -> torch.Tensor:
        """The prompt's keys and values into the cache (``caches``: batch slots (slots, L, Hkv, S, hd)
        and ``slot``; None: the engine's own); the last position's final hidden state, dense.
        ``start``: the prompt's first position (a later part of a prompt whose earlier positions are
        in the cache: prefill in chunks).

        With the native kernels the prompt runs as batched decode steps of ``PREFILL_CHUNK`` of its
        tokens (``step_batch``: each matrix read once per chunk, causal within the slot): per token what
        decoding it computes (to float32 rounding), and cheaper than the eager prefill at every length
        measured (8-512 tokens; see PREFILL_CHUNK). Without them, the eager prefill.
        # prompt: (T,) -> (1, D)"""
        prompt = prompt.reshape(-1)
        k, v = caches if caches is not None else (self.k_cache.unsqueeze(0), self.v_cache.unsqueeze(0))
        if self.native_steps is None:
            with self.using_cache(k[slot], v[slot]):
                return self.eager_forward(self.embed_tokens(prompt), start, hire=False)
        step = self.native_steps[False]
        for first in range(0, prompt.numel(), PREFILL_CHUNK):
            part = prompt[first : first + PREFILL_CHUNK]
            at = start + first
            out = step.step_batch(self.embed_tokens(part), torch.arange(at, at + part.numel()),
                                  torch.full((part.numel(),), slot), k, v)
        return out[-1:].to(self.dtype)

    def eager_forward(self, h: torch.Tensor, start: int, hire: bool) -> torch.Tensor:
        """The decoder in eager torch (prefill, and the reference of the native step).
        # h: (T, D) float32 embeddings of positions start.. -> (1, D)"""
        dt, spec, timing = self.dtype, self.spec, self._timing is not None
        for i, layer in enumerate(self.layers):
            t = time.perf_counter() if timing else 0.0
            n = layer.norms
            a = self.attention_block(layer, i, n[spec.pre_attention_norm](h, dt) if spec.pre_attention_norm else h.to(dt),
                                     start)
            a = n[spec.post_attention_norm](a, torch.float32) if spec.post_attention_norm else a.float()
            h = h + (a * self.residual_multiplier if self.residual_multiplier else a)
            t = self._clock("attention", t) if timing else t
            f = self.ffn_block(layer.module, n[spec.pre_ffn_norm](h, dt) if spec.pre_ffn_norm else h.to(dt), hire)
            f = n[spec.post_ffn_norm](f, torch.float32) if spec.post_ffn_norm else f.float()
            h = h + (f * self.residual_multiplier if self.residual_multiplier else f)
            if timing:
                self._clock("ffn", t)
        return self.norm(h[-1:], dt)

    def logits(self, hidden: torch.Tensor, hire: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """# hidden: (1, D) -> logits (1, m), token ids (1, m) or None for the whole vocabulary"""
        t = time.perf_counter() if self._timing is not None else 0.0
        if hire and self.head is not None:
            out = self.head.decode(hidden)
        else:  # float32 logits (also: an argmax over float16 is several times slower on CPU, 1.2 ms for Gemma's 262k)
            out = self.dense_logits(hidden), None
        if self._timing is not None:
            self._clock("head", t)
        return out

    @torch.no_grad()
    def log_prob(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target) under the exact logits over the whole vocabulary.  # hidden: (1, D), target: (1,) -> (1,)"""
        logits = self.dense_logits(hidden)  # (1, V)
        return logits.gather(-1, target.view(1, 1))[:, 0] - logits.logsumexp(-1)

    def dense_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The model's exact logits of the head rows ``rows`` (None: all) in float32: its bias added and
        its logit map applied (hire.layers.head.exact_logits), each row read once for the B states.
        # hidden: (B, D), rows: (m,) -> (B, m)"""
        return exact_logits(hidden, self.head_weight, rows, self.head_bias, self.head_native, self.logit_map)

    def kernel_report(self) -> dict:
        """Which decode kernels the HiRE layers run on (a fallback means a slower, dequantizing path)."""
        report = {}
        if self.head is not None:
            first = self.head.selector.proxies[0]
            blocks = self.head.selector.blocks
            fused = isinstance(first, LowRankProxy) and first.fused_first_pass(blocks)
            report["head"] = ([first.first_pass_kernel(blocks) if fused else first.decode_kind]
                              + ["rows"] * (len(self.head.selector.proxies) - 1))
        if self.ffns:
            if self.native_steps is not None:  # the proxy kernel the native step runs
                report["ffn"] = sorted({plan.ffn.proxy_kind for plan in self.plans})
            else:
                report["ffn"] = sorted({f.proxy.decode_kind for f in self.ffns})
        report["rows"] = "native" if native.available() else f"eager gather ({native.unavailable_reason()})"
        report["step"] = "native" if self.native_steps is not None else f"eager ({self.native_reason})"
        return report

    def tail(self, hidden: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor | None) -> TailBound | None:
        """What the sampler needs past the candidates ``idx`` of ``logits`` (hire.engine.sampling), or
        None where there are none (a dense step) or ``sample_tail`` is off.
        # hidden: (1, D), logits/idx: (1, m)"""
        if idx is None or self.head is None or not self.sample_tail:
            return None
        return self.head.tail(hidden, logits, idx)

    def next_token(self, hidden: torch.Tensor, hire: bool, temperature: float, top_k: int | None,
                   top_p: float | None, gen: torch.Generator | None,
                   policy: DensePolicy | None = None) -> torch.Tensor:
        """The next token from the final hidden state: greedy or top-k over the candidates, temperature
        and top-p past them (exact where the tail bound holds). With a ``policy`` (the sequence's), a
        temperature / top-p step may sample the dense head instead of probing HiRE (hire.engine.sampling:
        exact either way; greedy and top-k never consult it).  # hidden: (1, D) -> (1,)"""
        stats = self.sampling_stats
        adaptive = (policy is not None and hire and self.head is not None and self.sample_tail
                    and temperature > 0 and top_k is None)
        if adaptive and policy.dense_now():
            stats.skipped += 1
            return sample(self.logits(hidden, hire=False)[0], None, temperature, None, top_p, gen)
        logits, idx = self.logits(hidden, hire)
        tail = self.tail(hidden, logits, idx) if needs_tail(idx, temperature, top_k) else None
        if adaptive and tail is not None:
            policy.mark(stats)
        token = sample(logits, idx, temperature, top_k, top_p, gen, tail, stats)
        if adaptive and tail is not None:
            policy.probed(stats, self.head.vocab_size)
        return token

    # --- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def teacher_forced(self, tokens: torch.Tensor, *, hire: bool, start: int = 1,
                       log_probs: bool = False) -> tuple[list[int], float]:
        """Feed ``tokens`` (T,): a dense prefill of the first ``start``, then one decode step per
        token. Returns the greedy prediction for each position from start - 1 on (T - start + 1
        of them: compare them with tokens[start:]) and, with ``log_probs``, the summed exact
        log-probability of tokens[start:]."""
        tokens = tokens.reshape(-1)
        hidden = self.forward(tokens[:start], 0, hire=False)
        preds, total = [], 0.0
        for pos in range(start, tokens.numel() + 1):
            preds.append(int(sample(*self.logits(hidden, hire))))
            if pos == tokens.numel():
                break
            if log_probs:
                total += float(self.log_prob(hidden, tokens[pos : pos + 1]))
            hidden = self.forward(tokens[pos : pos + 1], pos, hire=hire)
        return preds, total

    @torch.inference_mode()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        hire: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_ids: tuple[int, ...] = (),
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationStats:
        """Prefill ``prompt`` (T,) densely, then decode up to ``max_new_tokens`` tokens."""
        prompt = prompt.reshape(-1)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt.numel() + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {self.max_seq_len}; "
                "raise max_seq_len"
            )
        gen = torch.Generator().manual_seed(seed)
        stats = GenerationStats(prompt_tokens=prompt.numel())
        t0 = time.perf_counter()
        hidden = self.prefill(prompt)
        policy = DensePolicy(self.probe_every)  # this sequence's: dense steps where HiRE fell back (sampling)
        token = self.next_token(hidden, hire, temperature, top_k, top_p, gen, policy)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        tokens = [token]
        pos = prompt.numel()
        for _ in range(max_new_tokens - 1):
            if on_token is not None or stop_ids:
                tid = int(token)  # streaming needs the id on the host; the timed benchmark passes neither
                if on_token is not None:
                    on_token(tid)
                if tid in stop_ids:
                    break
            hidden = self.forward(token, pos, hire=hire)
            token = self.next_token(hidden, hire, temperature, top_k, top_p, gen, policy)
            tokens.append(token)
            pos += 1
        stats.decode_s = time.perf_counter() - t1
        stats.token_ids = torch.cat(tokens).tolist()
        if on_token is not None and (not stop_ids or stats.token_ids[-1] not in stop_ids):
            on_token(stats.token_ids[-1])
        stats.new_tokens = len(stats.token_ids)
        return stats
