"""Token ids to text as they are generated: one incremental detokeniser for ``hire generate`` and
the server."""

from __future__ import annotations


class Detokenizer:
    """The text of the tokens added so far, given out in pieces (``add``) that never end inside a
    character: a byte-fallback tokenizer (SentencePiece's ``<0xE4>`` tokens) spells a CJK character
    or an emoji over several tokens, and their text is U+FFFD until the last one arrives.

    Each step decodes a short window, not the whole text (TGI's method): the tokens since the last
    piece given out, after the tokens of that piece for context (a SentencePiece decode drops the
    space of a window's first word, the same in both decodes, so their difference is exact).
    ``flush`` gives out what is left once no token follows (an unfinished character as U+FFFD, as a
    full decode writes it), so the pieces always add up to ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # every piece given out so far
        self.start = 0  # the window: ids[start:read] were given out last (context), ids[read:] not yet
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token: int) -> str:
        """The new piece of text after ``token``, or "" while it ends inside a character."""
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left (an unfinished character, as U+FFFD) once no more tokens come."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        context = self._decode(self.ids[self.start : self.read])
        window = self._decode(self.ids[self.start :])
        if len(window) <= len(context) or (window.endswith("\ufffd") and not final):
            return ""  # no new text yet (a special token skipped), or half a character
        piece = window[len(context) :]
        self.start, self.read = self.read, len(self.ids)
        self.text += piece
        return piece
