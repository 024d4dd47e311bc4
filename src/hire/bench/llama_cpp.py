"""llama.cpp's own ``llama-bench`` as the outside anchor of ``hire bench --llama-cpp``.

The anchor is llama.cpp's C++ benchmark, not a Python loop around llama-cpp-python: its token loop
has no Python in it, so what it reports is llama.cpp's speed, not the binding's. The binaries come
from, in order:

1. ``--llama-bench PATH`` or ``$HIRE_LLAMA_BENCH`` (``llama-quantize`` is looked for beside it);
2. a build cached in ``<hire cache>/llama.cpp/<version>/bin``;
3. a build made once into that cache from the llama.cpp source that the llama-cpp-python sdist of
   ``LLAMA_CPP_PYTHON_VERSION`` vendors (``pip download`` of the sdist, then cmake with
   ``GGML_NATIVE=ON``: this machine's SIMD, as a user who builds llama.cpp gets). Only the two
   targets are built (3.5 min on 2 idle cores); the build happens in a temporary folder that is renamed
   into place only when complete.

llama.cpp is an optional anchor for benchmarks, never a dependency of the library or its tests.
Run ``python -m hire.bench.llama_cpp`` to build (or find) it and print where it is.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hire.errors import HireError
from hire.paths import cache_root

# The llama-cpp-python release whose vendored llama.cpp is built (the one the README's earlier
# llama.cpp figures used); its sdist carries the llama.cpp git metadata, so the commit is known.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_VAR = "HIRE_LLAMA_BENCH"
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # -march=native: the SIMD of the machine that runs it, as a local build gets
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",  # nothing here downloads
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-bench and llama-quantize live in tools/
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries that survive the move into the cache
)
# -march=native minus AMX on x86: on the Sapphire Rapids VM this was built on, /proc/cpuinfo lists
# amx_tile/amx_int8 but ggml's AMX matmul segfaults on the first batched product (every pp test:
# SIGSEGV in ggml_backend_amx_mul_mat; tg runs). Explicit -mno-* flags win over -march in any order.
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


def cmake_options() -> list[str]:
    """CMAKE_OPTIONS, with AMX switched off where the compiler targets x86."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return list(CMAKE_OPTIONS)
    flags = " ".join(NO_AMX)
    return [*CMAKE_OPTIONS, f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]


BUILD_JOBS = 2
SIMD_MACROS = ("AVX", "AVX2", "FMA", "F16C", "AVX512F", "AVX512BW", "AVX512VL", "AVX512VNNI", "AVX512BF16",
               "AVX512FP16", "AVXVNNI", "AMX_TILE", "AMX_INT8", "AMX_BF16", "ARM_NEON", "ARM_FEATURE_DOTPROD")


class LlamaCppError(HireError, RuntimeError):
    """llama.cpp could not be found, built or run (the message says what failed and how to fix it)."""


@dataclass(frozen=True)
class LlamaCppTools:
    """The llama.cpp binaries used and what is known of their build."""

    bench: Path
    quantize: Path | None
    build: dict = field(default_factory=dict)  # version, commit, GGML_NATIVE, simd, source


def cache_location(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the build of ``version`` lives: ``<hire cache>/llama.cpp/<version>``."""
    return cache_root() / "llama.cpp" / version


def _tools_in(folder: Path, build: dict) -> LlamaCppTools | None:
    bench = folder / "llama-bench"
    if not (bench.is_file() and os.access(bench, os.X_OK)):
        return None
    quantize = folder / "llama-quantize"
    return LlamaCppTools(bench, quantize if quantize.is_file() else None, build)


def find_tools(explicit: str | Path | None = None, *, build: bool = True,
               progress: Callable[[str], None] | None = None) -> LlamaCppTools:
    """The llama-bench to run: ``explicit`` (a path), else ``$HIRE_LLAMA_BENCH``, else the cached
    build, else (``build``) build it now. Raises :class:`LlamaCppError` naming what is missing."""
    given = explicit or os.environ.get(ENV_VAR)
    if given:
        path = Path(given).expanduser()
        source = "--llama-bench" if explicit else f"${ENV_VAR}"
        if not path.is_file():
            raise LlamaCppError(f"{source} names {path}, which does not exist: give the path of a llama-bench binary "
                                "(or unset it to build one into the cache)")
        if not os.access(path, os.X_OK):
            raise LlamaCppError(f"{source} names {path}, which is not executable (chmod +x it)")
        quantize = path.parent / "llama-quantize"
        return LlamaCppTools(path, quantize if quantize.is_file() else None,
                             {"source": f"{source}={path}", "version": "unknown (given binary)"})
    home = cache_location()
    info = home / "build.json"
    found = _tools_in(home / "bin", json.loads(info.read_text()) if info.is_file() else {})
    if found is not None:
        return found
    if not build:
        raise LlamaCppError(f"no llama-bench in {home / 'bin'}: run `python -m hire.bench.llama_cpp` to build it, "
                            f"or point --llama-bench / ${ENV_VAR} at one")
    return build_llama_cpp(progress=progress)


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    (progress or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def _run_step(what: str, cmd: list[str], log: Path, fix: str, cwd: Path | None = None) -> None:
    """Run one build step, its output into ``log``; a failure names the step, the log's tail and the fix."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LlamaCppError(f"building llama.cpp failed at {what} (exit {code}; full log {log}):\n{tail}\n{fix}")


def compiler_simd(compiler: str) -> list[str]:
    """The SIMD extensions the build targets here: ``compiler -march=native`` with :func:`cmake_options`' flags."""
    extra = NO_AMX if len(cmake_options()) > len(CMAKE_OPTIONS) else ()
    try:
        out = subprocess.run([compiler, "-march=native", *extra, "-dM", "-E", "-x", "c++", os.devnull],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    defined = set(re.findall(r"#define __([A-Z0-9_]+)__ ", out))
    return [m for m in SIMD_MACROS if m in defined]


def build_llama_cpp(version: str = LLAMA_CPP_PYTHON_VERSION, *, jobs: int = BUILD_JOBS,
                    progress: Callable[[str], None] | None = None) -> LlamaCppTools:
    """Build llama-bench and llama-quantize from the llama.cpp that llama-cpp-python ``version``
    vendors, into :func:`cache_location` (atomically: a temporary folder renamed when complete)."""
    cmake, compiler = shutil.which("cmake"), shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None:
        raise LlamaCppError("building llama.cpp needs cmake, which is not on PATH: install it "
                            "(apt-get install cmake, or pip install cmake) or point --llama-bench at a built llama-bench")
    if compiler is None:
        raise LlamaCppError("building llama.cpp needs a C++ compiler (c++, g++ or clang++), none is on PATH: install one "
                            "(apt-get install g++) or point --llama-bench at a built llama-bench")
    home = cache_location(version)
    home.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".building", dir=home.parent))
    log = work / "build.log"
    started = time.perf_counter()
    try:
        sdist_dir = home.parent / "sdist"
        sdist_dir.mkdir(exist_ok=True)
        sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            _say(progress, f"llama.cpp: downloading the llama-cpp-python {version} sdist (its vendored llama.cpp) ...")
            with tempfile.TemporaryDirectory(dir=sdist_dir) as tmp:
                _run_step("pip download", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                           f"llama-cpp-python=={version}", "-d", tmp], log,
                          "Check that PyPI is reachable (or pip's index settings), or download the sdist by hand into "
                          f"{sdist_dir}.")
                got = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
                if got is None:
                    raise LlamaCppError(f"pip download gave no llama_cpp_python-{version}.tar.gz (log {log})")
                os.replace(got, sdist)
        _say(progress, f"llama.cpp: extracting {sdist.name} ...")
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
        source = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if source is None or not (source / "CMakeLists.txt").is_file():
            raise LlamaCppError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt: delete it and retry")
        build_dir = work / "build"
        _say(progress, f"llama.cpp: configuring (cmake, GGML_NATIVE=ON, {compiler}) ...")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_step("cmake configure", [cmake, "-S", str(source), "-B", str(build_dir), *generator, *cmake_options()], log,
                  "Check the compiler works (a C and a C++ compiler are needed) and cmake is >= 3.14.")
        _say(progress, f"llama.cpp: compiling {' and '.join(TARGETS)} with {jobs} jobs "
                       f"(3.5 min on 2 idle cores, 11 on busy ones; log {log}) ...")
        _run_step("cmake build", [cmake, "--build", str(build_dir), "--config", "Release", "--target", *TARGETS,
                                  "-j", str(jobs)], log, "See the log for the compiler error.")
        stage = work / "install"
        (stage / "bin").mkdir(parents=True)
        for target in TARGETS:
            built = next((p for p in build_dir.rglob(target) if p.is_file() and os.access(p, os.X_OK)), None)
            if built is None:
                raise LlamaCppError(f"the llama.cpp build finished but {target} is not in {build_dir}")
            shutil.copy2(built, stage / "bin" / target)
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        build = {
            "source": f"llama-cpp-python {version} sdist, vendor/llama.cpp",
            "version": version,
            "commit": commit or "unknown (no git metadata in the sdist)",
            "GGML_NATIVE": True,
            "simd": compiler_simd(compiler),
            "compiler": compiler,
            "cmake_options": cmake_options(),
            "build_s": round(time.perf_counter() - started, 1),
        }
        (stage / "build.json").write_text(json.dumps(build, indent=2))
        shutil.copy2(log, stage / "build.log")
        if home.exists():  # another process finished first: keep theirs
            found = _tools_in(home / "bin", build)
            if found is not None:
                return found
            shutil.rmtree(home)
        os.replace(stage, home)
        _say(progress, f"llama.cpp: built in {build['build_s'] / 60:.1f} min into {home / 'bin'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = _tools_in(home / "bin", build)
    assert found is not None
    return found


def llama_bench_command(tools: LlamaCppTools, gguf: str | Path, *, threads: int, n_prompt: int, n_gen: int,
                        repetitions: int) -> list[str]:
    """The llama-bench command line: ``n_prompt`` prompt tokens (pp) and ``n_gen`` generated tokens (tg)
    as separate tests, ``repetitions`` each after llama-bench's own warm-up, JSON on stdout."""
    return [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(repetitions), "-o", "json"]


def parse_llama_bench(text: str, binary: str = "llama-bench") -> dict:
    """llama-bench's ``-o json`` output -> {"tg": {...}, "pp": {...}, build fields}: per test its
    tokens/s (``avg_ts``), standard deviation, token count and samples. Raises on anything else."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlamaCppError(f"{binary} did not print llama-bench JSON ({err}; output began {text[:200]!r}): "
                            "is it llama.cpp's llama-bench?") from err
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise LlamaCppError(f"{binary} printed JSON that is not a list of llama-bench tests: {text[:200]!r}")
    out: dict = {}
    for test in tests:
        missing = [k for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts") if k not in test]
        if missing:
            raise LlamaCppError(f"{binary}'s JSON test lacks {', '.join(missing)}: not llama-bench output? {test!r:.200}")
        n_prompt, n_gen = int(test["n_prompt"]), int(test["n_gen"])
        kind = "pp" if n_gen == 0 else "tg" if n_prompt == 0 else None
        if kind is None:  # a combined pp+tg test (-pg) is neither figure
            continue
        if not float(test["avg_ts"]) > 0:
            raise LlamaCppError(f"{binary} reported {test['avg_ts']} tokens/s for {kind}{n_prompt or n_gen}")
        out[kind] = {"tokens_per_s": float(test["avg_ts"]), "stddev_tokens_per_s": float(test["stddev_ts"]),
                     "tokens": n_prompt or n_gen, "samples_tokens_per_s": [float(s) for s in test.get("samples_ts", [])]}
        for key in ("build_commit", "build_number", "cpu_info", "backends", "n_threads", "model_type", "model_size",
                    "model_n_params"):
            if key in test:
                out[key] = test[key]
    if not ("tg" in out or "pp" in out):
        raise LlamaCppError(f"{binary}'s JSON has no pp or tg test: {text[:200]!r}")
    return out


def run_llama_bench(tools: LlamaCppTools, gguf: str | Path, *, threads: int, n_prompt: int, n_gen: int,
                    repetitions: int = 1, timeout: float = 1800) -> dict:
    """One llama-bench run (see :func:`llama_bench_command`), parsed (:func:`parse_llama_bench`)."""
    cmd = llama_bench_command(tools, gguf, threads=threads, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as err:
        raise LlamaCppError(f"could not run {tools.bench} ({err}): is it a llama-bench binary for this machine?") from err
    except subprocess.TimeoutExpired as err:
        raise LlamaCppError(f"{tools.bench} ran past {timeout:.0f} s on {gguf}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise LlamaCppError(f"{tools.bench} failed on {gguf} (exit {done.returncode}):\n{tail}\n"
                            "Check that this llama.cpp reads the model's GGUF version and architecture.")
    return parse_llama_bench(done.stdout, str(tools.bench))


@dataclass(frozen=True)
class LlamaBenchRound:
    """One llama-bench run per bench round, interleaved with the engine's rounds: prefill of
    ``n_prompt`` tokens (pp) and decode of ``n_gen`` (tg) on ``gguf`` with ``threads`` threads."""

    tools: LlamaCppTools
    gguf: Path
    threads: int
    n_prompt: int = 512
    n_gen: int = 64
    repetitions: int = 1

    def command(self) -> list[str]:
        return llama_bench_command(self.tools, self.gguf, threads=self.threads, n_prompt=self.n_prompt,
                                   n_gen=self.n_gen, repetitions=self.repetitions)

    def run(self) -> dict:
        return run_llama_bench(self.tools, self.gguf, threads=self.threads, n_prompt=self.n_prompt, n_gen=self.n_gen,
                               repetitions=self.repetitions)


def main() -> int:
    """``python -m hire.bench.llama_cpp``: find or build llama-bench, print where it is and its build."""
    try:
        tools = find_tools()
    except LlamaCppError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"llama_bench": str(tools.bench), "llama_quantize": str(tools.quantize) if tools.quantize else None,
                      "build": tools.build}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
