"""twinkle_client loads the server's tokenizer on the client machine with torch unimportable: builtin:// ids
(rebuilt locally, same ids as the server's), mock://, a local folder and a hub id from the HF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twinkle.model.hub import load_tokenizer as hub_load_tokenizer
from twinkle.model.hub import resolve_model
from twinkle.model.mock import ByteTokenizer
from twinkle.types import NotFoundError
from twinkle_client.tokenizer import load_tokenizer, load_tokenizer_from_candidates

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am Twinkle."}]
TEXT = "Twinkle trains adapters, one notebook at a time."

_CHILD = r"""
import json, sys
sys.modules["torch"] = None  # importing torch raises ImportError
from twinkle_client.tokenizer import load_tokenizer
out = {}
for tid, vocab in json.loads(sys.argv[1]):
    tok = load_tokenizer(tid, vocab_size=vocab)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    out[tid] = {"chat": list(ids), "text": tok.encode(TEXT, add_special_tokens=False),
                "decoded": tok.decode(tok.encode(TEXT, add_special_tokens=False)),
                "eos": tok.eos_token_id, "type": type(tok).__name__}
assert "torch" not in sys.modules or sys.modules["torch"] is None
print(json.dumps(out))
"""


def _reference(tok) -> dict:
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return {"chat": list(ids), "text": tok.encode(TEXT, add_special_tokens=False), "eos": tok.eos_token_id}


def _fake_hf_cache(root: Path, repo: str, files_from: Path) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, snap / f.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_client_loads_every_kind_of_tokenizer_without_torch(tmp_path):
    built = resolve_model("builtin://tiny")  # the server's copy (the parent's cache)
    local = tmp_path / "local-tok"
    local.mkdir()
    for f in built.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name.endswith("map.json")):
            shutil.copy(f, local / f.name)
    hf_cache = tmp_path / "hf"
    _fake_hf_cache(hf_cache, "acme/toy-chat", built)
    cases = [("builtin://tiny", None), ("mock://byte", 264), (str(local), None), ("hf://acme/toy-chat", None),
             ("acme/toy-chat", None)]
    env = {**os.environ, "TWINKLE_HOME": str(tmp_path / "client-home"), "PYTHONPATH": str(REPO),
           "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    code = f"MESSAGES = {MESSAGES!r}\nTEXT = {TEXT!r}\n" + _CHILD
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    server_tok = hub_load_tokenizer("builtin://tiny", backend="transformers")  # what the server uses
    ref = _reference(server_tok)
    for tid in ("builtin://tiny", str(local), "hf://acme/toy-chat", "acme/toy-chat"):
        assert {k: got[tid][k] for k in ref} == ref, tid
        assert got[tid]["decoded"] == TEXT
    # the builtin tokenizer was rebuilt on the "client" (its own TWINKLE_HOME), not read from the server's path
    assert got["builtin://tiny"]["type"] == "LightTokenizer"
    assert (tmp_path / "client-home" / "models").is_dir()

    mock_ref = _reference(ByteTokenizer(extra_tokens=4))
    assert {k: got["mock://byte"][k] for k in mock_ref} == mock_ref
    assert got["mock://byte"]["type"] == "ByteTokenizer"


def test_mock_tokenizer_is_sized_by_the_reported_vocab():
    assert len(load_tokenizer("mock://byte", vocab_size=300)) == 300
    assert len(load_tokenizer("mock://byte")) == ByteTokenizer().vocab_size


def test_a_server_path_missing_here_falls_back_to_the_model_name(tmp_path):
    tok = load_tokenizer_from_candidates([str(tmp_path / "only-on-the-server"), "builtin://tiny"])
    assert tok.encode(TEXT, add_special_tokens=False) == _reference(
        hub_load_tokenizer("builtin://tiny", backend="tokenizers"))["text"]


def test_unknown_tokenizer_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(NotFoundError) as e:
        load_tokenizer_from_candidates([str(tmp_path / "nope"), "./also-not-here"])
    assert e.value.field == "tokenizer_id" and "nope" in str(e.value)
    with pytest.raises(NotFoundError) as e2:
        load_tokenizer_from_candidates([None, ""])
    assert e2.value.field == "tokenizer_id"
