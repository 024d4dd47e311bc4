"""A server that starts with the dense head and switches to HiRE once its head is fitted.

On a model whose head settings or proxy are not cached yet, fitting them takes minutes (choosing the
head on calibration text: ~2.5 min for a 0.5B GGUF on 2 cores). ``hire serve`` does not make its
first requests wait for that: it serves with the dense head at once, fits the head in a child process
at a lower CPU priority (``NICE``: the decode loop keeps the cores it needs, the fit takes what is
left), and switches the engine's head to HiRE between two decode steps when the child is done
(``Engine.enable_head``). The child writes the same cache entries ``hire eval`` and ``hire bench``
would, so the next start serves HiRE at once. The child loads its own copy of the model: the fit's
memory (1.7 GB for a 0.5B at its peak) comes on top of the server's for those minutes.

    python -m hire.serve.background --model M --config C.json --out DIR [...]   # the child
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS

NICE = 10  # the child's niceness (0 = the server's): the fit runs on what decoding leaves of the cores
RESULT = "head.json"  # written by the child into --out: the resolved config, and the proxy's file
PROXY = "proxy.safetensors"
LOG = "fit.log"  # the child's stderr


class BackgroundHead:
    """Fits ``config``'s head for ``model_name`` in a child process, then calls ``switch(config,
    proxy)`` (on the server's side: its decode loop's ``between_steps``) with the resolved config and
    the fitted proxy, or ``failed(reason)`` when the fit failed or chose to leave the head dense.
    ``fingerprint``: the server's own head's (``proxy_cache.head_fingerprint``, taken before the
    engine converts the model), which the child's proxy must have been fitted for."""

    def __init__(self, model_name: str, config: HiReConfig, *, fingerprint: str, switch: Callable, failed: Callable,
                 quantized: bool = True, seq_len: int = 512, calib_windows: int = CALIBRATION_WINDOWS,
                 nice: int = NICE):
        self.model_name, self.config, self.fingerprint = model_name, config, fingerprint
        self.switch, self.failed = switch, failed
        self.quantized, self.seq_len, self.calib_windows, self.nice = quantized, seq_len, calib_windows, nice
        self.started: float | None = None
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def command(self, out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "hire.serve.background", "--model", self.model_name,
               "--config", str(out / "config.json"), "--out", str(out), "--seq-len", str(self.seq_len),
               "--calib-windows", str(self.calib_windows), "--nice", str(self.nice)]
        if not self.quantized:
            cmd.append("--dequantized")
        return cmd

    def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="hire-head-")
        out = Path(self._dir.name)
        self.config.save(out / "config.json")
        self.started = time.monotonic()
        with open(out / LOG, "wb") as err:
            # the server's own session: with Linux's autogroup scheduling, nice only ranks processes
            # within a session (a session of its own took half the cores from the decode loop: 64 tokens
            # in 65.7 s against 1.2 s). A process group of its own keeps a Ctrl-C at the terminal for the
            # server, whose shutdown ends the child (stop); the child also ignores SIGINT (main).
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {}
            self.process = subprocess.Popen(self.command(out), stdout=subprocess.DEVNULL, stderr=err,
                                            stdin=subprocess.DEVNULL, **group)
        self._thread = threading.Thread(target=self._watch, args=(out,), name="hire-head-fit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the child if it still runs (the server is shutting down)."""
        self._stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def wait(self, timeout: float | None = None) -> None:
        """Until the child has ended and its result was handed on (tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self, out: Path) -> None:
        rc = self.process.wait()
        if self._stopped:
            return
        try:
            self._hand_on(out, rc)
        except Exception as err:  # noqa: BLE001 - a result we cannot use: the server stays dense and says why
            self.failed(f"the background fit's result could not be used ({type(err).__name__}: {err})")

    def _hand_on(self, out: Path, rc: int) -> None:
        from hire.calibrate.proxy_cache import load_head_proxy, proxy_meta

        if rc != 0:
            lines = (out / LOG).read_text(errors="replace").strip().splitlines()  # a traceback ends with its error
            self.failed(f"the background fit failed (exit status {rc}): {lines[-1] if lines else 'no output'}")
            return
        result = json.loads((out / RESULT).read_text())
        config = HiReConfig.from_dict(result["config"])
        if not config.head.enabled:
            self.failed(f"the head stays dense: {result.get('reason') or 'no head setting pays on this model'}")
            return
        proxy = None
        if result.get("proxy"):
            proxy = load_head_proxy(out / PROXY, expect=proxy_meta(None, config.head, fingerprint=self.fingerprint))
        self.switch(config, proxy)


def fit_head(model_name: str, config: HiReConfig, out: Path, *, quantized: bool = True, seq_len: int = 512,
             calib_windows: int = CALIBRATION_WINDOWS) -> dict:
    """The child's work: ``load_for_decode`` with fitting (the cache filled as any command fills it),
    then the resolved config and its proxy written into ``out``. Returns what it wrote."""
    from hire.calibrate.prepare import load_for_decode
    from hire.calibrate.proxy_cache import proxy_meta, save_head_proxy
    from hire.files import atomic_write_json

    prepared = load_for_decode(model_name, config, quantized=quantized, seq_len=seq_len,
                               calib_windows=calib_windows, progress=False, fit=True)
    result = {"config": prepared.config.to_dict(), "proxy": None,
              "reason": (prepared.auto or {}).get("reason")}
    if prepared.config.head.enabled and prepared.head_proxy is not None:
        save_head_proxy(out / PROXY, prepared.head_proxy, proxy_meta(prepared.model, prepared.config.head))
        result["proxy"] = PROXY
    atomic_write_json(out / RESULT, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fit a model's HiRE head for a running hire serve (its child process)")
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True, help="the HiReConfig JSON to resolve and fit")
    p.add_argument("--out", required=True, help=f"directory for {RESULT} and {PROXY}")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=CALIBRATION_WINDOWS)
    p.add_argument("--dequantized", action="store_true")
    p.add_argument("--nice", type=int, default=NICE)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the server's terminal is for the server
    if args.nice:
        os.nice(args.nice)
    fit_head(args.model, HiReConfig.load(args.config), Path(args.out), quantized=not args.dequantized,
             seq_len=args.seq_len, calib_windows=args.calib_windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
