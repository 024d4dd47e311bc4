"""Structured output: ``response_format`` ``json_object`` and ``json_schema`` as a token mask per step,
by llguidance (the grammar engine of llama.cpp, vLLM and SGLang; a Rust library without dependencies,
one wheel for every CPython).

``Grammars`` wraps the model's tokenizer for llguidance once (on first use: ~1 s for SmolLM2's
49,152 tokens) and compiles a request's format into a ``Constraint``: a matcher that, before each
step, gives the tokens the grammar allows (``allowed``) and, after it, consumes the chosen one
(``advance``); ``done`` once the value is complete (the sequence then ends, ``finish_reason``
"stop"). The decode loop (hire.serve.scheduler) applies the mask to the step's logits; with HiRE it
computes exact logits for exactly the allowed rows when they are few (``FEW_ROWS``), and otherwise
masks the head's candidates, falling back to the allowed rows when no candidate is allowed.
"""

from __future__ import annotations

import json

import numpy as np
import torch

# whitespace between a JSON value's tokens: pretty printing allowed (a newline and indentation), but
# bounded. llguidance's default ([ \n\r\t]+) let Gemma-3-270M write newlines until max_tokens after a
# string cut at its maxLength (4 of 6 requests in benchmarks/structured.py)
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,12}"
# a grammar step allowing at most this many tokens computes their exact logits instead of the head's
# candidates (HiRE's k' is thousands of rows: SmolLM2's 3,584, Gemma-3's 16,384)
FEW_ROWS = 1024


class GrammarError(ValueError):
    """A response format llguidance cannot compile (the message says why)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:  # the [serve] extra
        raise GrammarError(f"structured output needs llguidance ({exc.name} is missing): pip install 'hire[serve]'") \
            from None
    return llguidance


def schema_of(response_format: dict) -> dict | None:
    """The JSON schema a ``response_format`` asks for (``json_object``: any object), None for text."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return spec.get("schema") or {"type": "object"}
    raise GrammarError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


class Grammars:
    """A model's grammar engine: its tokenizer in llguidance's form (``vocab_size``: the head's rows,
    which may exceed the tokenizer's; ``stop_ids``: the tokens that end a turn)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int] | set[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._lltok = None

    def lltokenizer(self):
        if self._lltok is None:
            ll = _llguidance()
            eos = self.stop_ids or self.tokenizer.eos_token_id
            try:
                self._lltok = ll.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=eos)
            except (ValueError, TypeError) as exc:  # e.g. a tokenizer without a decoder, or not a fast one
                raise GrammarError(f"this model's tokenizer cannot drive the grammar engine: {exc}") from None
        return self._lltok

    def compile(self, response_format: dict) -> "Constraint | None":
        """The constraint of ``response_format`` (None for text); GrammarError when it cannot be compiled."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        ll = _llguidance()
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_flexible": True, "whitespace_pattern": WHITESPACE})
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid: {exc}") from None
        return self._constraint(grammar, "the JSON schema")

    def calls(self, lark: str) -> "Constraint":
        """The constraint of a Lark grammar (hire.serve.tools.calls_grammar: forced tool calls)."""
        return self._constraint(_llguidance().LLMatcher.grammar_from_lark(lark), "the tools' call grammar")

    def _constraint(self, grammar: str, what: str) -> "Constraint":
        ll = _llguidance()
        error = ll.LLMatcher.validate_grammar(grammar, self.lltokenizer())
        if error:
            raise GrammarError(f"{what} cannot be enforced: {error}")
        matcher = ll.LLMatcher(self.lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{what} cannot be enforced: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next.  # -> (V,) bool"""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed: {self.matcher.get_error()}")
        return torch.from_numpy(mask)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The value is complete: the grammar allows nothing but the end of the sequence."""
        return self.matcher.is_stopped()
