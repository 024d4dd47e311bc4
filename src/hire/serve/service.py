"""Load a model for serving and run the server (uvicorn)."""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch

from hire.calibrate.prepare import load_for_decode
from hire.calibrate.proxy_cache import head_fingerprint
from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS
from hire.engine import BatchDecoder, Engine
from hire.arch import engine_supported
from hire.errors import ConfigError, HireError
from hire.generate import codes_label, stop_token_ids
from hire.quant.tensor import ACT_BITS
from hire.serve.app import Service, create_app
from hire.serve.background import BackgroundHead
from hire.serve.scheduler import MAX_STALL, PREFILL_CHUNK, Scheduler


class UnsupportedForServing(HireError, ValueError):
    """The model cannot be served (the engine does not run its architecture)."""


def load_service(model_name: str, config: HiReConfig | None, *, slots: int = 8, context: int = 2048,
                 dense_above: float = 0.5, dense_batch: int | None = None, quantized: bool = True, dtype: str = "float16",
                 seq_len: int = 512, calib_windows: int = CALIBRATION_WINDOWS, progress: bool = True,
                 name: str | None = None, fit: bool = True, max_waiting: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, act_bits: int = ACT_BITS, max_stall: float = MAX_STALL,
                 background_fit: bool = False) -> Service:
    """``model_name`` under ``config`` (None: dense) in a decode loop of ``slots`` sequences of up to
    ``context`` tokens each; a GGUF model runs in its block codes unless ``quantized`` is False.
    ``dense_above``: the share of the head's rows past which a batch's union of candidates is read
    as the whole head; ``dense_batch``: the batch size from which the head is dense (None: never).
    ``fit=False``: where the head's settings or proxy are not cached, serve with the dense head at once
    (``info["head_pending"]`` says why) instead of fitting first (minutes on a first run); with
    ``background_fit``, the head is then fitted in a child process and the loop switches to it when it
    is ready (``Service.background``, a hire.serve.background.BackgroundHead that ``serve`` starts).
    ``max_waiting``: requests that may wait for a slot; past that a request gets a 429 (None: no bound).
    ``prefill_chunk``: the most prompt tokens prefilled between two decode steps of the running requests;
    ``max_stall``: while requests decode, a chunk takes at most this many decode steps' time (0: always
    ``prefill_chunk`` tokens; hire.serve.scheduler).
    ``act_bits``: the width of the codes' products' activations (``hire.quant.set_act_bits``)."""
    prepared = load_for_decode(model_name, config, quantized=quantized, seq_len=seq_len, calib_windows=calib_windows,
                               progress=progress, fit=fit, act_bits=act_bits)
    model, tokenizer, quantized = prepared.model, prepared.tokenizer, prepared.quantized
    if not engine_supported(model.config.model_type):
        raise UnsupportedForServing(
            f"hire serve runs the decode engine, which does not run {model.config.model_type!r} models "
            "(Llama, Mistral, Qwen2/3 and Gemma-3 layouts); use `hire generate` for this model")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ConfigError(f"--context {context} is longer than the model's {limit} positions; lower it")
    # the head's identity before the engine converts the model: what a proxy fitted elsewhere must match
    fingerprint = head_fingerprint(model) if prepared.pending and background_fit and config is not None else None
    engine = Engine(model, prepared.config, head_proxy=prepared.head_proxy, dtype=getattr(torch, dtype),
                    max_seq_len=context)
    decoder = BatchDecoder(engine, slots, dense_above=dense_above, dense_batch=dense_batch)
    hire = prepared.config is not None
    info = {"hire": hire, "weights": codes_label(act_bits) if quantized else dtype, "kernels": engine.kernel_report(),
            "context": context, "dense_above": dense_above, "dense_batch": dense_batch, "max_waiting": max_waiting,
            "prefill_chunk": prefill_chunk, "max_stall": max_stall}
    if hire:
        info["config"] = prepared.config.to_dict()
    if prepared.pending:
        info["head_pending"] = prepared.pending
    scheduler = Scheduler(decoder, hire=hire, max_waiting=max_waiting, prefill_chunk=prefill_chunk,
                          max_stall=max_stall)
    service = Service(name=name or model_name, tokenizer=tokenizer, scheduler=scheduler,
                      stop_ids=frozenset(stop_token_ids(tokenizer, model)), context=context, info=info)
    if fingerprint is not None:
        service.background = BackgroundHead(model_name, config, fingerprint=fingerprint, quantized=quantized,
                                            seq_len=seq_len, calib_windows=calib_windows,
                                            switch=lambda cfg, proxy: _switch_head(service, cfg, proxy),
                                            failed=lambda reason: _head_stays_dense(service, reason))
    return service


def _switch_head(service: Service, config: HiReConfig, proxy) -> None:
    """The background fit's result (its watcher thread): the decode loop switches its head to HiRE
    before its next step."""
    scheduler = service.scheduler
    engine = scheduler.decoder.engine
    started = service.background.started if service.background is not None else None

    def apply() -> None:
        try:
            engine.enable_head(config, proxy)
        except (ValueError, RuntimeError) as err:  # a proxy that does not fit this engine: serve on dense
            _head_stays_dense(service, f"switching to the fitted head failed ({type(err).__name__}: {err})")
            return
        info = service.info
        info.pop("head_pending", None)
        info["config"], info["kernels"] = config.to_dict(), engine.kernel_report()
        if started is not None:
            info["head_switched_after_s"] = round(time.monotonic() - started, 1)
        scheduler.hire = True
        head = config.head
        print(f"hire serve: HiRE head ready (rank {head.rank}, k' {head.candidates}), fitted in the background"
              + (f" in {info['head_switched_after_s']:.0f} s" if started is not None else "")
              + "; decoding with it from the next step", file=sys.stderr, flush=True)

    scheduler.between_steps(apply)


def _head_stays_dense(service: Service, reason: str) -> None:
    service.info.pop("head_pending", None)
    service.info["head_dense"] = reason
    print(f"hire serve: {reason}; serving on with the dense head", file=sys.stderr, flush=True)


class DecodeLoopFailed(HireError, RuntimeError):
    """The decode loop died: ``hire serve`` exits non-zero so that a supervisor restarts it."""


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info", api_key: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM: then no new connections; requests in flight finish, or are
    cancelled after ``shutdown_timeout`` seconds; the decode loop stops; the call returns. If the
    decode loop fails, the server shuts down and ``DecodeLoopFailed`` is raised (its requests got
    the error). ``api_key``: as ``create_app``'s.

    The decode loop runs in this (the main) thread and uvicorn on another (see ``Scheduler``);
    the signals reach uvicorn through the handlers installed here. A second signal stops at once."""
    import uvicorn

    config = uvicorn.Config(create_app(service, start_loop=False, api_key=api_key), host=host, port=port,
                            log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)

    def http() -> None:
        try:
            server.run()
        finally:  # shut down, or failed to start (a port in use): the decode loop ends too
            service.scheduler.stop()

    def on_signal(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="hire-http")
    thread.start()
    threading.Thread(target=service.warm_grammars, name="hire-grammars", daemon=True).start()
    if service.background is not None:
        service.background.start()
    try:
        service.scheduler.run()
    finally:
        server.should_exit = True
        if service.background is not None:
            service.background.stop()
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (is the port in use?)")
    if service.scheduler.error is not None:
        raise DecodeLoopFailed(f"the decode loop failed ({service.scheduler.error!r}); the server has shut down")
