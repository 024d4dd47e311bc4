"""Tools (function calling): the request's ``tools`` into the prompt, tool calls out of the text.

The wire format is Hermes' (Qwen2.5's template, and what most small open models are tuned on): a call
is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, a tool's answer comes back in a
``tool`` message. A chat template that renders ``tools`` itself (Qwen2.5's) gets them as
transformers passes them (``apply_chat_template(tools=)``); one that does not (SmolLM2's, and Gemma-3's
GGUF, which has no template) gets a system message that lists the tools as JSON and asks for that
format, assistant calls written back in it and tool answers as ``<tool_response>`` blocks in a user turn.

``tool_choice`` "required" or a named function is a grammar (llguidance, hire.serve.grammar): one or
more calls whose ``name`` is a tool's and whose ``arguments`` validate against its ``parameters``.
``ToolText`` splits the generated text as it arrives into content (given out as it comes) and calls
(held back from the first ``<tool_call>``, parsed at the end).
"""

from __future__ import annotations

import json
import re
import uuid

from hire.data import chat_text
from hire.serve.grammar import WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
INSTRUCTIONS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
                "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def template_renders_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def _arguments(call: dict):
    """A call's arguments as an object (OpenAI sends them as a JSON string); a string that is not
    JSON stays the client's own string."""
    args = call["function"].get("arguments") or "{}"
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def _call_text(call: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': call['function']['name'], 'arguments': _arguments(call)})}\n{CLOSE}"


def prompt_text(tokenizer, messages: list[dict], functions: list[dict] | None) -> str:
    """The conversation (OpenAI's messages, tool calls and tool answers included) and ``functions``
    (the tools' ``function`` objects) as the model sees them, ready for the assistant's turn."""
    functions = list(functions or ())
    if template_renders_tools(tokenizer):
        hf = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # transformers' templates take the arguments as an object
                m["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                                     "arguments": _arguments(c)}} for c in m["tool_calls"]]
            hf.append(m)
        return tokenizer.apply_chat_template(hf, tools=[{"type": "function", "function": f} for f in functions] or None,
                                             tokenize=False, add_generation_prompt=True)
    plain: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            answer = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if plain and plain[-1]["role"] == "user" and plain[-1]["content"].startswith("<tool_response>"):
                plain[-1]["content"] += "\n" + answer  # several answers to one turn's calls: one user turn
            else:
                plain.append({"role": "user", "content": answer})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [_call_text(c) for c in m["tool_calls"]]
            plain.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            plain.append({"role": m["role"], "content": m.get("content") or ""})
    if functions:
        listed = INSTRUCTIONS.format(tools="\n".join(json.dumps({"type": "function", "function": f}) for f in functions))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + listed}
        else:
            plain.insert(0, {"role": "system", "content": listed})
    return chat_text(tokenizer, plain, generation_prompt=True)


def call_schema(function: dict) -> dict:
    """A call of ``function`` as a JSON schema: its name, and arguments that validate against its
    parameters (any object where it has none)."""
    params = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def markers_are_tokens(tokenizer) -> bool:
    """Whether ``<tool_call>`` and ``</tool_call>`` are tokens of their own (Qwen2.5's added tokens): the
    grammar must then name them as tokens (llguidance's mask allows such a token for its text, but
    consuming it then fails)."""
    ids = tokenizer.convert_tokens_to_ids([OPEN, CLOSE])
    unknown = getattr(tokenizer, "unk_token_id", None)
    return all(i is not None and i != unknown for i in ids)


def calls_grammar(functions: list[dict], parallel: bool = True, marker_tokens: bool = False) -> str:
    """The Lark grammar (llguidance's) of one call (``parallel`` False) or one or more, each of one of
    ``functions``; ``marker_tokens``: the markers as the tokenizer's own tokens (``markers_are_tokens``)."""
    schema = call_schema(functions[0]) if len(functions) == 1 else {"anyOf": [call_schema(f) for f in functions]}
    schema["x-guidance"] = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE}
    more = ' ("\\n" block)*' if parallel else ""
    block = f'{OPEN} "\\n" call "\\n" {CLOSE}' if marker_tokens else f'"{OPEN}\\n" call "\\n{CLOSE}"'
    return f"start: block{more}\nblock: {block}\ncall: %json {json.dumps(schema)}\n"


class ToolText:
    """Generated text split into content and tool calls as it arrives: ``add`` gives out the content
    that cannot be the start of a call; from the first ``<tool_call>`` on the rest is held, and ``end``
    parses it: the calls (OpenAI's ``tool_calls``) and what content was left."""

    def __init__(self, names: set[str]):
        self.names = names
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> str:
        self.text += piece
        if self.sent == 0 and (not self.text.strip() or self.text.lstrip().startswith("{")):
            return ""  # nothing yet, or maybe a call's bare JSON: held to the end
        start = self.text.find(OPEN)
        if start == -1:  # hold back what could still become "<tool_call>"
            keep = next((k for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1)
                         if OPEN.startswith(self.text[-k:])), 0)
            end = len(self.text) - keep
        else:
            end = start
        out = self.text[self.sent : max(self.sent, end)]
        self.sent = max(self.sent, end)
        return out

    def split(self, text: str) -> tuple[str, list[dict]]:
        """A whole answer's (content, calls), as ``add`` then ``end`` give them."""
        given = self.add(text)
        rest, calls = self.end()
        return given + rest, calls

    def end(self) -> tuple[str, list[dict]]:
        """(content not given out yet, the calls). Text that does not parse as a call of a known tool
        stays content; an answer that is nothing but one call's JSON, without the markers (Qwen2.5-Coder
        0.5B's way with tool_choice "auto"), is that call."""
        rest = self.text[self.sent :]
        if self.sent == 0 and OPEN not in rest:
            bare = self._parse(rest.strip())
            if bare is not None:
                self.sent = len(self.text)
                return "", [bare]
        calls, kept, at = [], [], 0
        for match in CALL.finditer(rest):
            call = self._parse(match.group(1))
            if call is None:
                continue
            kept.append(rest[at : match.start()])
            at = match.end()
            calls.append(call)
        kept.append(rest[at:])
        content = "".join(kept).strip() if calls else rest
        return content, calls

    def _parse(self, body: str) -> dict | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(args)}}
