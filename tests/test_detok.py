"""One incremental detokeniser (hire.models.detok) for `hire generate` and the server: streamed
token by token, the text equals the full decode and never shows U+FFFD for valid text, when a
character is spelled over several tokens (SentencePiece byte fallback, byte-level BPE)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hire.models.detok import Detokenizer
from hire.serve.text import TextStream

TEXTS = ["日本語のテキスト", "emoji 😀🎉 and 👩‍👩‍👧 family", "naïve café, 中文 mixed with ascii", "🦩", "a  b   c"]


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer: lowercase letters, ``▁`` and a few words; every other
    character goes out as its UTF-8 bytes, one ``<0xE4>``-style token each (Llama/Gemma's decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁and", "▁with", ","]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("▁a", "n"), ("▁an", "d"), ("▁", "w"), ("▁w", "i"), ("▁wi", "t"), ("▁wit", "h")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _stream(tokenizer, ids):
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    return pieces, detok.flush(), detok.text


def _check(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, rest, streamed = _stream(tokenizer, ids)
    assert streamed == "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in streamed and rest == ""
    return ids


@pytest.fixture(scope="module")
def sp():
    return byte_fallback_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_text_streams_whole_characters(sp, text):
    ids = _check(sp, text)
    if any(ord(c) > 127 for c in text):  # the case at issue: a character over several byte tokens
        assert any(sp.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
        assert any("\ufffd" in sp.decode(ids[: n + 1]) for n in range(len(ids)))


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
def test_any_text_streams_as_its_full_decode(sp, text):
    _check(sp, text)


def test_a_stream_cut_inside_a_character_ends_as_the_full_decode_does(sp):
    ids = sp("語", add_special_tokens=False).input_ids[:-1]  # two of its three bytes
    pieces, rest, streamed = _stream(sp, ids)
    assert not any(pieces) and rest == streamed == sp.decode(ids) and "\ufffd" in rest


def test_special_tokens_are_skipped(sp):
    ids = sp("ab", add_special_tokens=False).input_ids + [sp.eos_token_id]
    assert _stream(sp, ids)[2] == "ab"


def test_the_server_stream_gives_the_same_text_and_cuts_its_stops(sp):
    ids = sp("日本 and 😀 with end", add_special_tokens=False).input_ids
    s = TextStream(sp, ["with"])
    got = "".join(s.add(t) for t in ids if not s.stopped) + s.flush()
    assert got == "日本 and 😀 " and s.stopped and "\ufffd" not in got


@pytest.mark.parametrize("name", ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_the_packaged_tokenizers_stream_whole_characters(name):
    """SmolLM2's byte-level BPE splits CJK characters over tokens; Gemma falls back to byte tokens
    for rare characters (its tokenizer loads in ~20 s from the GGUF: slow)."""
    from transformers import AutoTokenizer

    from hire.models import BUILTIN_MODELS, ModelPackageMissing

    try:
        path = BUILTIN_MODELS[name].locate()
    except ModelPackageMissing as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + ["𠜎𠜱𠝹 rare", "Ünïcödé ✓ ∑ ≠ 🚀"]:
        _check(tokenizer, text)
