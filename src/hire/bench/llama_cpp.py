"""llama.cpp's own ``llama-bench`` as the outside anchor of ``hire bench --llama-cpp``.

The anchor is llama.cpp's C++ benchmark, not a Python loop around llama-cpp-python: its token loop
has no Python in it, so what it reports is llama.cpp's speed, not the binding's. The binaries come
from, in order:

1. ``--llama-bench PATH`` or ``$HIRE_LLAMA_BENCH`` (``llama-quantize`` is looked for beside it);
2. the builds cached in ``<hire cache>/llama.cpp/<version>/``: ``bin`` (``GGML_NATIVE=ON`` as
   llama.cpp ships it) and, where the CPU has AMX, ``bin-noamx`` (the same with ``-mno-amx-*``);
3. builds made once into that cache from the llama.cpp source that the llama-cpp-python sdist of
   ``LLAMA_CPP_PYTHON_VERSION`` vendors (``pip download`` of the sdist, then cmake with
   ``GGML_NATIVE=ON``: this machine's SIMD, as a user who builds llama.cpp gets). Only the two
   targets are built (3.5 min per variant on 2 idle cores); each build happens in a temporary folder
   whose result is renamed into place only when complete.

Why two variants where the CPU has AMX: on the Sapphire Rapids VM this was written on, ggml's AMX
matmul decodes the small models up to 2.2x faster than the build without it, but segfaults on
every batched product (pp) unless ``--repack 0``; the build without AMX runs pp (and pp faster than
AMX with ``--repack 0``). The anchor is llama.cpp at its best here, so every test runs on every
variant and the best one that runs it is the figure (:class:`LlamaBenchRounds`).

llama.cpp is an optional anchor for benchmarks, never a dependency of the library or its tests.
Run ``python -m hire.bench.llama_cpp`` to build (or find) it and print where it is.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import statistics
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
from hire.system import cpu_flags

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
# -march=native minus AMX: on the Sapphire Rapids VM this was built on, /proc/cpuinfo lists
# amx_tile/amx_int8 and ggml's AMX matmul segfaults on the first batched product (every pp test:
# SIGSEGV in ggml_backend_amx_mul_mat) but decodes faster. Explicit -mno-* flags win over -march.
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


@dataclass(frozen=True)
class Variant:
    """One llama.cpp build: its name, its folder and build record in the cache, its extra C/C++ flags."""

    name: str
    folder: str
    record: str
    flags: tuple[str, ...] = ()


NATIVE = Variant("native", "bin", "build.json")  # a CPU without AMX: one build, plain GGML_NATIVE=ON
WITH_AMX = Variant("amx", "bin", "build.json")  # plain GGML_NATIVE=ON where -march=native has AMX
WITHOUT_AMX = Variant("noamx", "bin-noamx", "build-noamx.json", NO_AMX)


def cpu_has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists AMX (``amx_tile``) among its flags (False where that cannot be read)."""
    return "amx_tile" in cpu_flags(str(cpuinfo))


def variants_here() -> list[Variant]:
    """The builds this machine gets: with and without AMX where the CPU has it, else the native one."""
    if platform.machine().lower() in ("x86_64", "amd64") and cpu_has_amx():
        return [WITH_AMX, WITHOUT_AMX]
    return [NATIVE]


def cmake_options(variant: Variant = NATIVE) -> list[str]:
    """CMAKE_OPTIONS, plus the variant's C and C++ flags (none for a plain native build)."""
    if not variant.flags:
        return list(CMAKE_OPTIONS)
    flags = " ".join(variant.flags)
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
    variant: str = "given"  # "amx", "noamx", "native", or "given" (a binary the user named)


def cache_location(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the build of ``version`` lives: ``<hire cache>/llama.cpp/<version>``."""
    return cache_root() / "llama.cpp" / version


def _tools_in(folder: Path, build: dict, variant: str = "given") -> LlamaCppTools | None:
    bench = folder / "llama-bench"
    if not (bench.is_file() and os.access(bench, os.X_OK)):
        return None
    quantize = folder / "llama-quantize"
    return LlamaCppTools(bench, quantize if quantize.is_file() else None, build, variant)


def cached_variant(variant: Variant, home: Path | None = None) -> LlamaCppTools | None:
    """The cached build of ``variant``, or None: absent, or recorded with other cmake options (an
    older layout, e.g. ``bin`` built without AMX; the next build replaces it)."""
    home = cache_location() if home is None else home
    info = home / variant.record
    build = json.loads(info.read_text()) if info.is_file() else {}
    if "cmake_options" in build and build["cmake_options"] != cmake_options(variant):
        return None
    return _tools_in(home / variant.folder, build, variant.name)


def find_tools(explicit: str | Path | None = None, *, build: bool = True,
               progress: Callable[[str], None] | None = None) -> LlamaCppTools:
    """One llama.cpp build (for its ``llama-quantize``): the first of :func:`find_variants` that has one."""
    found = find_variants(explicit, build=build, progress=progress)
    return next((t for t in found if t.quantize is not None), found[0])


def find_variants(explicit: str | Path | None = None, *, build: bool = True,
                  progress: Callable[[str], None] | None = None) -> list[LlamaCppTools]:
    """The llama-bench binaries to run: ``explicit`` (a path), else ``$HIRE_LLAMA_BENCH`` (one binary,
    variant "given"), else the cached build of every one of :func:`variants_here`, the missing ones
    built now (``build``). Raises :class:`LlamaCppError` naming what is missing."""
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
        return [LlamaCppTools(path, quantize if quantize.is_file() else None,
                              {"source": f"{source}={path}", "version": "unknown (given binary)"})]
    home = cache_location()
    wanted = variants_here()
    missing = [v for v in wanted if cached_variant(v, home) is None]
    if missing and not build:
        raise LlamaCppError(f"no llama-bench in {', '.join(str(home / v.folder) for v in missing)}: run "
                            f"`python -m hire.bench.llama_cpp` to build it, or point --llama-bench / ${ENV_VAR} at one")
    if missing:
        build_llama_cpp(variants=missing, progress=progress)
    found = [cached_variant(v, home) for v in wanted]
    if any(t is None for t in found):
        raise LlamaCppError(f"the llama.cpp build into {home} finished but a llama-bench is missing: delete {home} "
                            "and retry")
    return found


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


def compiler_simd(compiler: str, variant: Variant = NATIVE) -> list[str]:
    """The SIMD extensions ``variant``'s build targets here: ``compiler -march=native`` with its flags."""
    try:
        out = subprocess.run([compiler, "-march=native", *variant.flags, "-dM", "-E", "-x", "c++", os.devnull],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    defined = set(re.findall(r"#define __([A-Z0-9_]+)__ ", out))
    return [m for m in SIMD_MACROS if m in defined]


def build_llama_cpp(version: str = LLAMA_CPP_PYTHON_VERSION, *, variants: list[Variant] | None = None,
                    jobs: int = BUILD_JOBS, progress: Callable[[str], None] | None = None) -> list[LlamaCppTools]:
    """Build llama-bench and llama-quantize from the llama.cpp that llama-cpp-python ``version``
    vendors, once per variant (default :func:`variants_here`: the same cmake command, with and
    without ``-mno-amx-*``), each into its folder of :func:`cache_location` (atomically: a temporary
    folder renamed when complete)."""
    variants = variants_here() if variants is None else variants
    cmake, compiler = shutil.which("cmake"), shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None:
        raise LlamaCppError("building llama.cpp needs cmake, which is not on PATH: install it "
                            "(apt-get install cmake, or pip install cmake) or point --llama-bench at a built llama-bench")
    if compiler is None:
        raise LlamaCppError("building llama.cpp needs a C++ compiler (c++, g++ or clang++), none is on PATH: install one "
                            "(apt-get install g++) or point --llama-bench at a built llama-bench")
    home = cache_location(version)
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".building", dir=home.parent))
    log = work / "build.log"
    built_tools: list[LlamaCppTools] = []
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
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        for variant in variants:
            built_tools.append(_build_variant(variant, version, source, commit, work, home, cmake, compiler, jobs,
                                              progress))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return built_tools


def _build_variant(variant: Variant, version: str, source: Path, commit: str, work: Path, home: Path, cmake: str,
                   compiler: str, jobs: int, progress: Callable[[str], None] | None) -> LlamaCppTools:
    """Configure, compile and install one variant into ``home/variant.folder`` (see :func:`build_llama_cpp`)."""
    started = time.perf_counter()
    log = work / f"build-{variant.name}.log"
    build_dir = work / f"build-{variant.name}"
    what = f"{variant.name} build: GGML_NATIVE=ON" + (f" {' '.join(variant.flags)}" if variant.flags else "")
    _say(progress, f"llama.cpp: configuring the {what} (cmake, {compiler}) ...")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run_step("cmake configure", [cmake, "-S", str(source), "-B", str(build_dir), *generator, *cmake_options(variant)],
              log, "Check the compiler works (a C and a C++ compiler are needed) and cmake is >= 3.14.")
    _say(progress, f"llama.cpp: compiling {' and '.join(TARGETS)} ({variant.name}) with {jobs} jobs "
                   f"(3.5 min on 2 idle cores, 11 on busy ones; log {log}) ...")
    _run_step("cmake build", [cmake, "--build", str(build_dir), "--config", "Release", "--target", *TARGETS,
                              "-j", str(jobs)], log, "See the log for the compiler error.")
    stage = work / f"install-{variant.name}"
    stage.mkdir()
    for target in TARGETS:
        built = next((p for p in build_dir.rglob(target) if p.is_file() and os.access(p, os.X_OK)), None)
        if built is None:
            raise LlamaCppError(f"the llama.cpp build finished but {target} is not in {build_dir}")
        shutil.copy2(built, stage / target)
    build = {
        "source": f"llama-cpp-python {version} sdist, vendor/llama.cpp",
        "version": version,
        "variant": variant.name,
        "commit": commit or "unknown (no git metadata in the sdist)",
        "GGML_NATIVE": True,
        "simd": compiler_simd(compiler, variant),
        "compiler": compiler,
        "cmake_options": cmake_options(variant),
        "build_s": round(time.perf_counter() - started, 1),
    }
    found = cached_variant(variant, home)
    if found is not None:  # another process finished first: keep theirs
        return found
    # The record first, the folder last: a llama-bench in the folder means the build is complete.
    shutil.rmtree(home / variant.folder, ignore_errors=True)
    (home / variant.record).write_text(json.dumps(build, indent=2))
    shutil.copy2(log, home / variant.record.replace(".json", ".log"))
    os.replace(stage, home / variant.folder)
    _say(progress, f"llama.cpp: built in {build['build_s'] / 60:.1f} min into {home / variant.folder}")
    found = cached_variant(variant, home)
    assert found is not None
    return found


def llama_bench_command(tools: LlamaCppTools, gguf: str | Path, *, threads: int, n_prompt: int, n_gen: int,
                        repetitions: int, depth: int = 0) -> list[str]:
    """The llama-bench command line: ``n_prompt`` prompt tokens (pp) and ``n_gen`` generated tokens (tg)
    as separate tests, ``repetitions`` each after llama-bench's own warm-up, JSON on stdout; ``depth``
    > 0: after that many tokens of context (-d)."""
    return [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(repetitions), "-o", "json"] + (["-d", str(depth)] if depth else [])


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
                     "tokens": n_prompt or n_gen, "samples_tokens_per_s": [float(s) for s in test.get("samples_ts", [])],
                     "depth": int(test.get("n_depth", 0))}  # tokens of context before the test (-d)
        for key in ("build_commit", "build_number", "cpu_info", "backends", "n_threads", "model_type", "model_size",
                    "model_n_params"):
            if key in test:
                out[key] = test[key]
    if not ("tg" in out or "pp" in out):
        raise LlamaCppError(f"{binary}'s JSON has no pp or tg test: {text[:200]!r}")
    return out


class LlamaBenchCrash(LlamaCppError):
    """llama-bench exited with a non-zero status (``returncode``; negative: killed by that signal)."""

    def __init__(self, message: str, returncode: int, tail: str):
        super().__init__(message)
        self.returncode, self.tail = returncode, tail

    def record(self) -> dict:
        """The JSON record of the crash: exit status, the signal's name if one killed it, stderr's tail."""
        out: dict = {"exit": self.returncode, "stderr_tail": self.tail}
        if self.returncode < 0:
            try:
                out["signal"] = signal.Signals(-self.returncode).name
            except ValueError:
                out["signal"] = f"signal {-self.returncode}"
        return out


def run_llama_bench(tools: LlamaCppTools, gguf: str | Path, *, threads: int, n_prompt: int, n_gen: int,
                    repetitions: int = 1, depth: int = 0, timeout: float = 1800) -> dict:
    """One llama-bench run (see :func:`llama_bench_command`), parsed (:func:`parse_llama_bench`).
    A non-zero exit raises :class:`LlamaBenchCrash`."""
    cmd = llama_bench_command(tools, gguf, threads=threads, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                              depth=depth)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as err:
        raise LlamaCppError(f"could not run {tools.bench} ({err}): is it a llama-bench binary for this machine?") from err
    except subprocess.TimeoutExpired as err:
        raise LlamaCppError(f"{tools.bench} ran past {timeout:.0f} s on {gguf}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise LlamaBenchCrash(f"{tools.bench} failed on {gguf} (exit {done.returncode}):\n{tail}\n"
                              "Check that this llama.cpp reads the model's GGUF version and architecture.",
                              done.returncode, tail)
    return parse_llama_bench(done.stdout, str(tools.bench))


class LlamaBenchRounds:
    """llama.cpp's side of the bench rounds: in every round, each test (tg: ``-p 0 -n n_gen``, after
    ``depth`` tokens of context when > 0; pp: ``-p n_prompt -n 0``, when ``n_prompt``) on each build in
    ``variants``, as separate llama-bench
    runs on ``gguf`` with ``threads`` threads. A build that exits non-zero on a test cannot run that
    test here: its exit status is recorded and it is not run on that test again; the test fails only
    when no build can run it. The builds' order rotates by round, so none always runs first."""

    def __init__(self, variants: list[LlamaCppTools], gguf: str | Path, *, threads: int, n_prompt: int = 512,
                 n_gen: int = 64, repetitions: int = 1, depth: int = 0):
        if not variants:
            raise ValueError("LlamaBenchRounds needs at least one llama-bench build")
        names = [t.variant for t in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"the llama-bench builds need distinct variant names, got {names}")
        self.variants, self.gguf, self.threads = list(variants), Path(gguf), threads
        self.n_prompt, self.n_gen, self.repetitions, self.depth = n_prompt, n_gen, repetitions, depth
        self.failed: dict[tuple[str, str], dict] = {}  # (test, variant) -> crash record

    def tests(self) -> list[tuple[str, int, int, int]]:
        """(test, n_prompt, n_gen, depth) per llama-bench test run in a round (only tg runs at ``depth``)."""
        return [("tg", 0, self.n_gen, self.depth)] + ([("pp", self.n_prompt, 0, 0)] if self.n_prompt else [])

    def command(self, tools: LlamaCppTools, test: str) -> list[str]:
        n_prompt, n_gen, depth = next((p, g, d) for t, p, g, d in self.tests() if t == test)
        return llama_bench_command(tools, self.gguf, threads=self.threads, n_prompt=n_prompt, n_gen=n_gen,
                                   repetitions=self.repetitions, depth=depth)

    def run(self, round_index: int = 0) -> dict:
        """One round: {test: {variant: parsed llama-bench output}}; builds that cannot run a test are left out."""
        k = round_index % len(self.variants)
        order = self.variants[k:] + self.variants[:k]
        out: dict = {}
        for test, n_prompt, n_gen, depth in self.tests():
            out[test] = {}
            for tools in order:
                if (test, tools.variant) in self.failed:
                    continue
                try:
                    parsed = run_llama_bench(tools, self.gguf, threads=self.threads, n_prompt=n_prompt, n_gen=n_gen,
                                             repetitions=self.repetitions, depth=depth)
                except LlamaBenchCrash as crash:
                    self.failed[(test, tools.variant)] = {**crash.record(), "round": round_index}
                    continue
                if test not in parsed:
                    raise LlamaCppError(f"{tools.bench} printed no {test} test for "
                                        f"{' '.join(self.command(tools, test))}: is it llama.cpp's llama-bench?")
                if parsed[test]["depth"] != depth:  # (a llama-bench too old for -d reports none)
                    raise LlamaCppError(f"{tools.bench} ran {test} after {parsed[test]['depth']} tokens of context, not "
                                        f"{depth}: a llama-bench without -d (n_depth)? Pass a newer one (--llama-bench) "
                                        "or leave --context out")
                out[test][tools.variant] = {**{k: v for k, v in parsed.items() if k not in ("tg", "pp")}, **parsed[test]}
            if all((test, t.variant) in self.failed for t in self.variants):
                raise LlamaCppError(f"no llama-bench build can run the {test} test on {self.gguf}: " + "; ".join(
                    f"{t.variant} ({t.bench}) exited {self.failed[(test, t.variant)]['exit']}:\n"
                    f"{self.failed[(test, t.variant)]['stderr_tail']}" for t in self.variants))
        return out

    def summary(self, rounds: list[dict]) -> dict:
        """Per test: every build's median and per-round tokens/s (or its crash), and the best build (the
        highest median among those that ran the test in every round) with its figures and command."""
        out: dict = {}
        for test, *_ in self.tests():
            per: dict = {}
            for tools in self.variants:
                got = [r[test][tools.variant]["tokens_per_s"] for r in rounds if tools.variant in r.get(test, {})]
                entry: dict = {"command": self.command(tools, test), "tokens_per_s_rounds": got}
                if got:
                    entry["tokens_per_s"] = statistics.median(got)
                if (test, tools.variant) in self.failed:
                    entry["failed"] = self.failed[(test, tools.variant)]
                per[tools.variant] = entry
            complete = [v for v, e in per.items() if "failed" not in e and len(e["tokens_per_s_rounds"]) == len(rounds)]
            if not complete:
                raise LlamaCppError(f"no llama-bench build ran the {test} test in every round: {per}")
            best = max(complete, key=lambda v: per[v]["tokens_per_s"])
            tokens = next(r[test][best]["tokens"] for r in reversed(rounds))  # as llama-bench reports it
            out[test] = {"tokens": tokens, "best": best, "tokens_per_s": per[best]["tokens_per_s"],
                         "tokens_per_s_rounds": per[best]["tokens_per_s_rounds"], "command": per[best]["command"],
                         "variants": per}
        return out

    def builds(self, rounds: list[dict]) -> dict:
        """Per build: its record (build.json) with what llama-bench itself reported of its build."""
        out = {}
        for tools in self.variants:
            seen = next((r[t][tools.variant] for r in reversed(rounds) for t in r if tools.variant in r[t]), {})
            out[tools.variant] = {"llama_bench": str(tools.bench), **tools.build,
                                  **{k: seen[k] for k in ("build_commit", "build_number", "cpu_info", "backends")
                                     if k in seen}}
        return out


def main() -> int:
    """``python -m hire.bench.llama_cpp``: find or build the llama-bench builds, print where they are and how built."""
    try:
        found = find_variants()
    except LlamaCppError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({t.variant: {"llama_bench": str(t.bench), "llama_quantize": str(t.quantize) if t.quantize else None,
                                  "build": t.build} for t in found}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
