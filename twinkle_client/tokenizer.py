"""Load the tokenizer of a server's base model on the client machine — without torch.

``load_tokenizer(tokenizer_id)`` accepts what the server's capabilities report (``BaseModelInfo.tokenizer_id``,
falling back to the model's name):

* ``builtin://NAME`` — rebuilt here from the text bundled with the package (builtin tokenizers are
  deterministic, so the ids equal the server's); needs the ``tokenizers`` package;
* ``mock://…`` — the mock backend's byte tokenizer (numpy only); ``vocab_size`` sizes its reserved tokens;
* a local directory that exists on this machine (``tokenizer.json`` …);
* a hub id — ``hf://org/name`` or ``org/name`` — read from the Hugging Face cache (when not cached and
  downloads are allowed, only the tokenizer files are fetched).

A ``transformers`` tokenizer is returned when transformers is installed and loads; otherwise (the light client
install, or a machine without a working torch) a ``twinkle.model.hub.LightTokenizer`` with the same
``encode``/``decode``/``apply_chat_template``/``eos_token_id`` interface.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twinkle.types import InvalidInputError, NotFoundError, TwinkleError, UnsupportedError

__all__ = ["load_tokenizer", "load_tokenizer_from_candidates"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "chat_template*", "vocab*", "merges*", "*.model",
                    "*.tiktoken", "config.json", "generation_config.json"]


def load_tokenizer(tokenizer_id: str | os.PathLike[str], *, vocab_size: int | None = None) -> Any:
    """The tokenizer named by ``tokenizer_id`` (see the module docstring). Errors name ``tokenizer_id``."""
    text = str(tokenizer_id).strip() if isinstance(tokenizer_id, (str, os.PathLike)) else ""
    if not text:
        raise InvalidInputError("tokenizer_id must be a non-empty string", field="tokenizer_id")
    if text.startswith("mock://"):
        return _mock_tokenizer(vocab_size)
    if text.startswith("builtin://"):
        from twinkle.model.hub import load_tokenizer as _hub_load

        return _hub_load(text, backend="tokenizers")
    return _load_dir(_local_dir(text))


def load_tokenizer_from_candidates(ids: Iterable[str | None], *, vocab_size: int | None = None) -> Any:
    """The first of ``ids`` that loads (e.g. the server's ``tokenizer_id``, then the model's name)."""
    first: Exception | None = None
    tried: list[str] = []
    for tid in ids:
        if not tid or tid in tried:
            continue
        tried.append(tid)
        try:
            return load_tokenizer(tid, vocab_size=vocab_size)
        except (TwinkleError, OSError, ValueError) as e:
            first = first or e
    if first is None:
        raise NotFoundError("the server reported no tokenizer for this model", field="tokenizer_id")
    raise NotFoundError(f"could not load a tokenizer from {', '.join(map(repr, tried))}: {first}",
                        field="tokenizer_id") from first


def _mock_tokenizer(vocab_size: int | None) -> Any:
    from twinkle.model.mock.tokenizer import ByteTokenizer

    base = ByteTokenizer().vocab_size
    extra = max(0, int(vocab_size) - base) if vocab_size else 0
    return ByteTokenizer(extra_tokens=extra)


def _local_dir(text: str) -> Path:
    spec = text[len("file://"):] if text.startswith("file://") else text
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    repo = text[len("hf://"):] if text.startswith("hf://") else text
    if text.startswith("hf://") or (_HUB_ID.match(repo) and not repo.startswith((".", "/", "~"))):
        return _hub_snapshot(repo, text)
    raise NotFoundError(f"tokenizer {text!r} is not a directory on this machine (nor builtin://, mock:// or a hub "
                        f"id)", field="tokenizer_id")


def _hub_snapshot(repo_spec: str, text: str) -> Path:
    repo, _, rev = repo_spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UnsupportedError(f"tokenizer {text!r} needs the huggingface_hub package", field="tokenizer_id") from None
    from twinkle.model.hub import hf_cache_dir, hub_offline

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(repo, revision=rev or None, cache_dir=cache, local_files_only=True))
    except Exception as e:
        local_error = e
    if hub_offline():
        raise NotFoundError(f"tokenizer {text!r} is not in the Hugging Face cache and downloads are off "
                            f"({type(local_error).__name__})", field="tokenizer_id")
    try:  # only the tokenizer's files, never the weights
        return Path(snapshot_download(repo, revision=rev or None, cache_dir=cache, allow_patterns=_TOKENIZER_FILES))
    except Exception as e:
        raise NotFoundError(f"tokenizer {text!r} is neither cached nor downloadable: {type(e).__name__}: {e}",
                            field="tokenizer_id") from None


def _load_dir(path: Path) -> Any:
    from twinkle.model.hub import LightTokenizer

    if _transformers_usable():
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception:
            if not (path / "tokenizer.json").is_file():
                raise
    return LightTokenizer.from_pretrained(path)


def _transformers_usable() -> bool:
    """transformers is installed and importable here (it is absent from the light client install, and a
    broken or blocked torch can make its import fail)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        import transformers  # noqa: F401
    except Exception:
        return False
    return True
