"""Text in and out of the decode loop: prompts (the chat template), and the generated text streamed
piece by piece with the request's stop strings cut out."""

from __future__ import annotations

import torch

from hire.models.detok import Detokenizer


class TextStream:
    """The text of the tokens added so far, given out in pieces (``add``) that never end inside a
    character (a token may carry part of one) nor inside what could still become a stop string.
    The first stop string in the text ends it there (it is not part of the text)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = Detokenizer(tokenizer)  # whole characters only (hire.models.detok)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # characters a stop may still be completing
        self.sent = 0  # characters given out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The new piece of text after ``token`` ("" while it holds a piece back). Once a stop
        string appears, ``stopped`` is set and the text ends before it."""
        if not self.detok.add(token):  # no new text: half a character, or a special token
            return ""
        self.text = text = self.detok.text
        cut = min((i for i in (text.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            return self._upto(cut)
        return self._upto(max(self.sent, len(text) - self.hold))

    def flush(self) -> str:
        """What was held back, once no more tokens come (not after a stop string)."""
        if self.stopped:
            return ""
        self.detok.flush()  # an unfinished character at the end, as U+FFFD
        self.text = self.detok.text
        return self._upto(len(self.text))

    def _upto(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


class TokenText:
    """A token's own text and bytes, as OpenAI's logprobs give them (``token``, ``bytes``): a
    byte-level BPE token (GPT-2's, SmolLM2's, Qwen's) maps its characters back to bytes, a
    SentencePiece byte token (``<0xE4>``) is that byte, and its word marker is a space; so a
    character spread over several tokens has its bytes split among them, and ``token`` is their
    text with U+FFFD where a token holds part of a character."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.cache:
            self.cache[token] = self._text(token)
        return self.cache[token]

    def _text(self, token: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            data = b""
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            data = bytes([int(piece[3:5], 16)])
        elif token in self.tokenizer.all_special_ids:
            data = piece.encode()
        elif "\u2581" in piece:
            data = piece.replace("\u2581", " ").encode()
        elif all(c in self.byte_of for c in piece):
            data = bytes(self.byte_of[c] for c in piece)
        else:
            data = self.tokenizer.decode([int(token)]).encode()
        return data.decode("utf-8", errors="replace"), list(data)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def chat_prompt(tokenizer, messages: list[dict], functions: list[dict] | None = None) -> torch.Tensor:
    """The messages and ``functions`` (the tools' function definitions) as the model sees them
    (``hire.serve.tools.prompt_text``: its chat template, else ``Role: content`` lines; tool calls and
    answers in Hermes' format), ready for the assistant's turn.  # -> (T,) token ids"""
    from hire.serve.tools import prompt_text

    text = prompt_text(tokenizer, messages, functions)
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids  # one BOS, not two
    return torch.tensor(ids, dtype=torch.long)


def completion_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as ``hire generate`` tokenizes it (with the tokenizer's BOS).  # -> (T,) token ids"""
    return torch.tensor(tokenizer(prompt).input_ids, dtype=torch.long)
