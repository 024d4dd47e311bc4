import pytest
import torch

import hire
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.eval import bytes_per_token, evaluate
from tiny_models import ARCHS, FFN, VOCAB, WIDTH, make


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_k_equal_n_eval_is_lossless(arch):
    model = make(arch)
    windows = torch.randint(0, VOCAB, (2, 24))
    cfg = HiReConfig(head=HeadConfig(k=10, candidates=VOCAB, proxy="int4"), ffn=FFNConfig(density=1.0))
    r = evaluate(model, windows, cfg, progress=False)
    assert r["ppl_hire"] == pytest.approx(r["ppl_dense"], rel=1e-5)
    assert r["greedy_agreement"] == 1.0 and r["head_greedy_agreement"] == 1.0
    assert r["head_recall_at_1"] == 1.0 and r["head_recall_at_k"] == 1.0 and r["ffn_recall"] == 1.0
    assert r["positions"] == 48
    assert not hasattr(model, "hire_config")  # evaluate restores the model


def test_eval_reports_recall_and_bytes_for_realistic_settings():
    model = make("llama")
    windows = torch.randint(0, VOCAB, (2, 32))
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=32, proxy="int8"), ffn=FFNConfig(density=0.5))
    r = evaluate(model, windows, cfg, progress=False)
    for key in ("model", "ppl_dense", "ppl_hire", "greedy_agreement", "head_recall_at_1", "head_recall_at_k",
                "head_greedy_agreement", "ffn_recall", "bytes_per_token_dense", "bytes_per_token_hire",
                "head_bytes_fraction"):
        assert r[key] is not None, key
    assert 0 < r["head_recall_at_k"] <= 1 and 0 < r["head_recall_at_1"] <= 1
    assert len(r["ffn_recall_per_layer"]) == 2
    # int8 head: V rows of (64 codes + 1 scale), plus 32 exact rows in 16 bits
    assert r["bytes_hire"]["head"] == VOCAB * (WIDTH + 2) + 32 * WIDTH * 2
    assert r["head_bytes_fraction"] == pytest.approx(r["bytes_hire"]["head"] / (VOCAB * WIDTH * 2))
    assert r["bytes_per_token_hire"] < r["bytes_per_token_dense"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_bytes_count_every_weight_once(arch):
    model = make(arch)
    b = bytes_per_token(model)["dense"]
    params = {id(p): p for p in model.parameters()}.values()
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    expected = sum(p.numel() for p in params) * 2 - (0 if tied else emb.numel() * 2) + WIDTH * 2
    assert b["total"] == expected
    assert b["head"] >= VOCAB * WIDTH * 2
    assert b["ffn"] >= 2 * 2 * WIDTH * FFN  # patched or not, same FFN count
    hire.sparsify_(model, HiReConfig(head=HeadConfig(proxy="int8", candidates=64), ffn=FFNConfig(density=0.5)))
    assert bytes_per_token(model)["dense"] == b


@pytest.mark.parametrize("ffn", [False, True])
@pytest.mark.parametrize("arch", ["llama", "granite", "gemma2"])
def test_eval_measures_what_the_whole_models_logits_give(arch, ffn, monkeypatch):
    """hire eval reads the dense logits a few positions at a time (and, when only the head differs,
    takes the HiRE column from the same pass): perplexity, recall and agreement are those of the
    model's own forward pass and its full (T, V) logits, whatever the chunk, including what the model
    does to its logits after the head (Granite divides them, Gemma 2 soft-caps them)."""
    from hire.eval import quality
    from hire.eval.quality import perplexity
    from hire.patch import set_mode
    from hire.topk import recall_at_k

    model = make(arch)
    windows = torch.randint(0, VOCAB, (3, 24))
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=32, proxy="int8"),
                     ffn=FFNConfig(density=0.5) if ffn else FFNConfig(enabled=False))
    monkeypatch.setattr(quality, "SELECT_CHUNK", 7)  # 24 positions: chunks of 7, 7, 7, 3
    monkeypatch.setattr(quality, "HEAD_ROWS", 37)  # the head in slices of 37 rows, the last one short
    monkeypatch.setattr(quality, "STATE_BATCH", 2)  # windows two at a time: groups of 2 and 1 (slices of 18 and 37 rows)
    r = evaluate(model, windows, cfg, progress=False)
    assert r["ppl_dense"] == pytest.approx(perplexity(model, windows), rel=1e-5)
    hire.sparsify_(model, cfg)
    head = model.get_output_embeddings()
    r1 = rk = 0.0
    for window in windows:  # the same figures from the whole window's logits
        set_mode(model, head="dense", ffn="dense")
        out = model(window.unsqueeze(0), output_hidden_states=True)
        logits, states = out.logits[0], out.hidden_states[-1][0]
        top = logits.topk(5, dim=-1).indices
        cand = head.selector.select(states)  # the last hidden state is the final norm's output
        r1 += float(recall_at_k(top[:, :1], cand).sum())
        rk += float(recall_at_k(top, cand).sum())
    set_mode(model, head="dense", ffn="always")
    hire_ppl = perplexity(model, windows)
    hire.unsparsify_(model)
    assert r["head_recall_at_1"] == pytest.approx(r1 / 72) and r["head_recall_at_k"] == pytest.approx(rk / 72)
    assert r["ppl_hire"] == pytest.approx(hire_ppl, rel=1e-5)
    if not ffn:
        assert r["ppl_hire"] == r["ppl_dense"]
