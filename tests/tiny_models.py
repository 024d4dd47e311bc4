"""Tiny random-config models of every architecture in hire.arch.ARCHITECTURES (tests/test_patch.py checks it)."""

import torch
from transformers import (
    GPT2Config,
    GraniteConfig,
    GraniteForCausalLM,
    GPT2LMHeadModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB, WIDTH, FFN = 384, 64, 128
_common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common, tie_word_embeddings=True))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common, tie_word_embeddings=False))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_common, head_dim=16, tie_word_embeddings=True))
    elif arch == "granite":  # multipliers off 1 so that each one shows
        model = GraniteForCausalLM(GraniteConfig(**_common, tie_word_embeddings=True, embedding_multiplier=3.0,
                                                 attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif arch == "olmo2":  # no pre-norms; q and k normalised over all heads at once
        model = Olmo2ForCausalLM(Olmo2Config(**_common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2))
    elif arch == "smollm3":  # layer 1 of 2 without RoPE (no_rope_layers: 1 rotates, 0 does not)
        model = SmolLM3ForCausalLM(SmolLM3Config(**_common, no_rope_layers=[1, 0], tie_word_embeddings=True,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**_common, head_dim=16))
    elif arch == "gemma2":  # soft-caps its attention scores and logits (caps low enough to bite); local and global layers alternate
        model = Gemma2ForCausalLM(Gemma2Config(**_common, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=1.5))
    elif arch == "gemma3_text":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**_common, head_dim=16, sliding_window=32, query_pre_attn_scalar=16))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**_common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_inner=FFN, n_layer=2, n_head=4, n_positions=256))
    elif arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=WIDTH, ffn_dim=FFN, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=WIDTH, max_position_embeddings=256))
    else:
        raise ValueError(arch)
    # random init leaves a flat softmax: sharpen it so greedy decoding is not a coin toss
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt"]
