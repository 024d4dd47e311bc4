"""`hire serve`: an OpenAI-compatible server over the HiRE engine, with batched decoding."""

from __future__ import annotations

import argparse
import os
import sys

from hire.commands._args import DTYPES, add_act_bits, add_model_args, build_config, integer, number
from hire.errors import HireError

HELP = "serve a model over the OpenAI API (completions, chat, streaming), batched"
DESCRIPTION = (
    "Serve a model over an OpenAI-compatible HTTP API: POST /v1/completions and /v1/chat/completions (with "
    "stream), GET /v1/models, /health and /metrics (Prometheus). Requests that arrive together share decode "
    "steps (continuous batching, "
    "up to --slots at once); with HiRE, a step computes the union of its rows' head candidates. Accepted and "
    "ignored: metadata, store, user, service_tier; a null is the field's default. logprobs (chat's "
    "top_logprobs) over the whole vocabulary; under HiRE the tail of the normaliser is estimated from the head's "
    "proxy. response_format json_object and json_schema, enforced by a grammar (llguidance). tools and "
    "tool_choice: Hermes-format calls parsed into tool_calls, \"required\" or a named function by grammar. Not "
    "supported (a 400 naming the field): echo, best_of, suffix, logit_bias, penalties, n > 1. SIGTERM "
    "or Ctrl-C lets requests in flight finish (up to --shutdown-timeout), then exits; a failed decode loop exits "
    "non-zero (and /health answers 503 until then).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=integer(minimum=0, maximum=65535), default=8000, help="(default 8000)")
    p.add_argument("--name", help="the model's name in the API (default: --model)")
    p.add_argument("--dense", action="store_true", help="serve the dense engine (no HiRE), for comparison")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the HiRE head before serving where this model's head settings or proxy are not cached "
                        "yet (minutes on a first run); without it such a server starts at once with the dense head, "
                        "fits the head in a child process at a lower CPU priority and switches to HiRE when it is "
                        "ready (cached for later starts, as hire bench or hire eval with the same flags cache it)")
    p.add_argument("--no-background-fit", action="store_true",
                   help="with the head not fitted yet, serve with the dense head and fit nothing")
    p.add_argument("--slots", type=integer(minimum=1, maximum=64), default=8,
                   help="sequences decoded together at most; more requests wait (default 8)")
    p.add_argument("--context", type=integer(minimum=2), default=2048,
                   help="tokens per sequence, prompt and completion (a KV cache slot each; default 2048)")
    p.add_argument("--dense-above", type=number(above=0, maximum=1), default=0.5,
                   help="read the whole head when a batch's union of candidates exceeds this share of its rows "
                        "(default 0.5)")
    p.add_argument("--dense-batch", type=integer(minimum=0), default=8,
                   help="steps of this many sequences or more use the dense head, without selecting candidates "
                        "(0: never; default 8, where HiRE measured no faster on either packaged model)")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="weights in the engine (default float16)")
    p.add_argument("--dequantized", action="store_true",
                   help="run a GGUF model dequantized to --dtype (the default runs it in its GGUF block codes)")
    add_act_bits(p)
    p.add_argument("--max-waiting", type=integer(minimum=0), default=64,
                   help="requests that may wait for a free slot; past that a request gets a 429 with Retry-After "
                        "(default 64)")
    p.add_argument("--prefill-chunk", type=integer(minimum=1), default=128,
                   help="the most prompt tokens prefilled between two decode steps of the running requests, so that "
                        "a long prompt does not stall them for its whole length (default 128)")
    p.add_argument("--max-stall", type=number(minimum=0), default=1.0,
                   help="while requests decode, a prompt's chunk is sized (from measured times) to add at most this "
                        "many decode steps' time to their next token (default 1; 0: always --prefill-chunk tokens; "
                        "larger: the long prompt's first token sooner, the running streams' tokens later)")
    p.add_argument("--api-key", default=os.environ.get("HIRE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $HIRE_API_KEY; "
                        "none: open to anyone who can reach --host)")
    p.add_argument("--shutdown-timeout", type=number(minimum=0), default=30.0,
                   help="seconds requests in flight get to finish on SIGTERM before they are cancelled (default 30)")


def run(args: argparse.Namespace) -> int:
    try:
        from hire.serve import load_service, serve
    except ImportError as exc:  # fastapi/uvicorn are the [serve] extra
        raise HireError(f"hire serve needs the serve extra ({exc.name} is missing): pip install 'hire[serve]'") from None
    config = None if args.dense else build_config(args)
    service = load_service(args.model, config, slots=args.slots, context=args.context, dense_above=args.dense_above,
                           dense_batch=args.dense_batch or None,
                           quantized=not args.dequantized, dtype=args.dtype, seq_len=args.seq_len,
                           calib_windows=args.calib_windows, name=args.name, fit=args.calibrate,
                           max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk, max_stall=args.max_stall,
                           act_bits=args.act_bits, background_fit=not args.no_background_fit)
    pending = service.info.get("head_pending")
    kind = "dense" if config is None or pending else "HiRE"
    print(f"hire serve: {service.name} ({kind}, {service.info['weights']}), {args.slots} slots of "
          f"{args.context} tokens, on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    if pending and service.background is not None:
        print(f"hire serve: dense head for now: {pending}. Fitting it in the background (a child process at a lower "
              "CPU priority, minutes; cached for later starts); the server switches to HiRE when it is ready",
              file=sys.stderr, flush=True)
    elif pending:
        print(f"hire serve: dense head: {pending}. This command with --calibrate (or without --no-background-fit, or "
              "hire bench / hire eval with the same model and head flags) fits and caches it once, in minutes; "
              "later starts serve with HiRE", file=sys.stderr, flush=True)
    serve(service, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, api_key=args.api_key)
    return 0
