"""The OpenAI API's request bodies as the server takes them, and its error bodies.

A null means the field's default, as in OpenAI's schema. Fields OpenAI accepts that change nothing
here are accepted and ignored (``metadata``, ``store``, ``user``, ``service_tier``,
``parallel_tool_calls``). Served: ``logprobs`` (chat's ``top_logprobs``: each token's log-probability
over the whole vocabulary, hire.engine.logprobs; under HiRE the normaliser's tail comes from the head's
proxy), ``response_format`` ``json_object`` and ``json_schema`` (a grammar, hire.serve.grammar), and
``tools`` with ``tool_choice``, assistant ``tool_calls`` and tool messages (hire.serve.tools). Settings
whose meaning the server would silently break are refused with a 400 that names them: ``echo``,
``best_of``, ``suffix``, ``logit_bias``, penalties other than 0, ``n`` other than 1. Unknown fields (a
typo) are refused as OpenAI refuses them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    """An error the client caused (or the server's state), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers  # of the response (a 429's Retry-After)

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, kind=self.kind)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _drop_nulls(data):
    """A JSON object's null fields left out, so that each takes its default (OpenAI: null is "not set")."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Sampled(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, as vLLM and llama.cpp's server take it
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored: these fields change nothing the server returns
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        return _drop_nulls(data)

    def check(self) -> None:
        """What pydantic's types cannot say: the parts of the API this server does not implement."""
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice (n=1)", param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's bound for completions
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise APIError(400, f"one prompt per request ({len(self.prompt)} given)", param="prompt")
        for name, default in (("echo", False), ("best_of", None), ("suffix", None)):
            if getattr(self, name) not in (default, 1 if name == "best_of" else default):
                raise APIError(400, f"{name} is not supported by this server", param=name)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null: an assistant turn's (OpenAI's, beside tool calls)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    @model_validator(mode="after")
    def _content(self) -> "Message":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (only an assistant message's may be null)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def plain(self) -> dict:
        """The message as chat templates take it (hire.serve.tools.prompt_text)."""
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    def check(self) -> None:
        super().check()
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens disagree", param="max_completion_tokens")
            if self.max_completion_tokens < 1:
                raise APIError(400, f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}",
                               param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        kind = (self.response_format or {"type": "text"}).get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"response_format {kind!r} is not one of text, json_object, json_schema",
                           param="response_format")
        names = []
        for i, tool in enumerate(self.tools or ()):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"]) \
                    or not isinstance(fn.get("parameters", {}), dict):
                raise APIError(400, "each tool is {\"type\": \"function\", \"function\": {\"name\": <1-64 of "
                               "a-z, A-Z, 0-9, _ and ->, \"description\", \"parameters\": <JSON schema>}}",
                               param=f"tools.{i}")
            names.append(fn["name"])
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        elif choice not in (None, "none", "auto", "required"):
            raise APIError(400, f"tool_choice {choice!r} is not one of none, auto, required or a function",
                           param="tool_choice")
        elif choice == "required" and not names:
            raise APIError(400, "tool_choice \"required\" needs tools", param="tool_choice")
        if names and self.response_format and self.response_format.get("type", "text") != "text" \
                and choice not in ("none",):
            raise APIError(400, "response_format with tools is not supported: ask for one or the other",
                           param="response_format")

    @property
    def functions(self) -> list[dict]:
        """The tools the model is shown (none with tool_choice "none")."""
        return [] if self.tool_choice == "none" else [t["function"] for t in self.tools or ()]

    @property
    def forced(self) -> list[dict] | None:
        """The functions a call must be one of (tool_choice "required" or a named one), else None."""
        if isinstance(self.tool_choice, dict):
            return [f for f in self.functions if f["name"] == self.tool_choice["function"]["name"]]
        return self.functions if self.tool_choice == "required" else None
