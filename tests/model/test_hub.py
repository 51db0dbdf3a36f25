"""Model id resolution and the builtin toy models (built into a per-test TWINKLE_HOME)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinkle.model.builtin import BUILTIN_MODELS, build_builtin, builtin_dir_name
from twinkle.model.hub import load_tokenizer, resolve_model
from twinkle.types import InvalidInputError, NotFoundError, UnsupportedError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _num_params(path: Path) -> int:
    from safetensors.numpy import load_file

    return sum(a.size for a in load_file(str(path / "model.safetensors")).values())


def test_builtin_tiny_is_cached_under_twinkle_home_with_a_versioned_name(home):
    p = resolve_model("builtin://tiny")
    assert p.parent == home / "models"
    assert p.name.startswith("builtin-tiny-v") and p.name == builtin_dir_name("tiny")
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):
        assert (p / f).is_file(), f
    assert 0.7e6 < _num_params(p) < 1.5e6
    before = (p / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("builtin://tiny") == p  # second call reuses the cache
    assert (p / "model.safetensors").stat().st_mtime_ns == before
    assert not [x for x in p.parent.iterdir() if x.name.startswith(".tmp")]


def test_builtin_small_size(tmp_path):
    p = build_builtin("small", tmp_path)
    assert 20e6 <= _num_params(p) <= 50e6
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == BUILTIN_MODELS["small"].hidden_size


def test_builds_are_byte_identical(tmp_path):
    a = build_builtin("tiny", tmp_path / "a")
    b = build_builtin("tiny", tmp_path / "b")
    assert a.name == b.name
    assert _digest(a) == _digest(b)


def test_concurrent_builders_agree(tmp_path):
    code = ("import sys; from twinkle.model.builtin import build_builtin; "
            "print(build_builtin('tiny', sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    final = Path(outs[0])
    assert sorted(x.name for x in tmp_path.iterdir()) == [final.name]  # no temp folders left behind
    assert _digest(final) == _digest(build_builtin("tiny", tmp_path / "fresh"))


def test_builtin_loads_with_transformers_and_special_ids_agree(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    p = resolve_model("builtin://tiny")
    model = AutoModelForCausalLM.from_pretrained(str(p))
    tok = AutoTokenizer.from_pretrained(str(p))
    gen = GenerationConfig.from_pretrained(str(p))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id in gen.eos_token_id and gen.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size >= len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "who are you?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"
    # the bundled text makes the self-cognition words compact
    assert len(tok.encode(" Twinkle assistant", add_special_tokens=False)) == 2


def test_light_tokenizer_matches_transformers(home):
    from transformers import AutoTokenizer

    light = load_tokenizer("builtin://tiny", backend="tokenizers")
    hf = AutoTokenizer.from_pretrained(str(resolve_model("builtin://tiny")))
    texts = ["Hello   world\n\n  12345 x  ", "ünïcödé 漢字 (hello) it's", "What is 17 + 25? I am Twinkle."]
    for t in texts:
        assert light.encode(t) == hf.encode(t, add_special_tokens=False)
        assert light.decode(light.encode(t)) == t
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    assert light.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(msgs, tokenize=False)
    assert light.eos_token_id == hf.eos_token_id and light.pad_token_id == hf.pad_token_id


def test_builtin_and_light_tokenizer_need_no_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from twinkle.model.hub import load_tokenizer, resolve_model\n"
        "p = resolve_model('builtin://tiny'); t = load_tokenizer('builtin://tiny', backend='tokenizers')\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'who are you?'}], add_generation_prompt=True)\n"
        "assert t.decode(ids).endswith('<|im_start|>assistant\\n'), t.decode(ids)\n"
        "print(p)\n"
    )
    env = {**os.environ, "TWINKLE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == tmp_path / "models"


def test_local_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model(tmp_path) == tmp_path.resolve()


def _fake_hf_cache(root: Path, repo: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_hf_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_hf_cache(tmp_path, "acme/toy-model")
    assert resolve_model("hf://acme/toy-model") == snap
    assert resolve_model("acme/toy-model") == snap  # a bare hub id means hf://
    assert resolve_model(f"hf://acme/toy-model@{snap.name}") == snap


def test_hf_absent_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError) as e:
        resolve_model("hf://acme/not-there")
    assert e.value.field == "model_id" and "acme/not-there" in str(e.value)


def test_ms_without_modelscope_is_a_clear_error():
    try:
        import modelscope  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedError) as e:
            resolve_model("ms://acme/toy")
        assert e.value.field == "model_id" and "modelscope" in str(e.value)
    else:
        pytest.skip("modelscope is installed here")


@pytest.mark.parametrize("bad", ["s3://bucket/model", "builtin://huge", "", "   ", "builtin://", "hf://not a repo"])
def test_bad_ids_raise_invalid_input(bad):
    with pytest.raises(InvalidInputError) as e:
        resolve_model(bad)
    assert e.value.field == "model_id"


def test_missing_local_path_is_not_found(tmp_path):
    with pytest.raises(NotFoundError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert e.value.field == "model_id"


def test_load_tokenizer_rejects_unknown_backend():
    with pytest.raises(InvalidInputError) as e:
        load_tokenizer("builtin://tiny", backend="sentencepiece")
    assert e.value.field == "backend"


def test_builtin_tokenizer_only_build_matches_the_full_build(tmp_path, monkeypatch):
    from twinkle.model.builtin import build_builtin_tokenizer

    tok_dir = build_builtin_tokenizer("small", tmp_path / "a")
    assert not (tok_dir / "model.safetensors").exists()
    full = build_builtin("small", tmp_path / "b")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / f).read_bytes() == (full / f).read_bytes()
    assert build_builtin_tokenizer("small", tmp_path / "b") == full  # reuses a full build when present
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "c"))
    tok = load_tokenizer("builtin://small", backend="tokenizers")
    assert not list((tmp_path / "c" / "models").glob("*/model.safetensors"))
    assert tok.encode("who are you?") == load_tokenizer(str(full), backend="tokenizers").encode("who are you?")
