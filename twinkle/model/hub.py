"""Model id resolution (offline first) and a torch-free tokenizer loader.

``resolve_model(model_id)`` turns any accepted id into a local folder in the Hugging Face layout:

* a local directory path → itself;
* ``builtin://tiny`` / ``builtin://small`` → built locally in about a second, cached under
  ``$TWINKLE_HOME/models`` (default ``~/.cache/twinkle``); see ``twinkle.model.builtin``;
* ``hf://org/name[@revision]`` (or a bare ``org/name`` that is not a local path) → the HF hub cache;
  works offline when the snapshot is cached, downloads when the network allows and ``HF_HUB_OFFLINE`` is
  unset;
* ``ms://org/name[@revision]`` → ModelScope (needs the optional ``modelscope`` package).

Nothing here imports torch. ``load_tokenizer`` returns a ``transformers`` tokenizer when transformers is
installed (which imports torch) or, with ``backend="tokenizers"`` or without transformers, a light tokenizer
built from ``tokenizer.json`` with the ``tokenizers`` package only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twinkle.types import InvalidInputError, NotFoundError, UnsupportedError

SCHEMES = ("builtin", "hf", "ms")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def twinkle_home() -> Path:
    """``$TWINKLE_HOME`` or ``~/.cache/twinkle``."""
    return Path(os.environ.get("TWINKLE_HOME") or "~/.cache/twinkle").expanduser()


def models_dir() -> Path:
    """Where builtin models are cached: ``$TWINKLE_HOME/models``."""
    return twinkle_home() / "models"


def resolve_model(model_id: str | os.PathLike[str]) -> Path:
    """A local HF-layout folder for ``model_id`` (see the module docstring). Errors name ``model_id``."""
    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id).strip():
        raise InvalidInputError("model_id must be a non-empty string", field="model_id")
    text = str(model_id).strip()
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if not rest:
            raise InvalidInputError(f"model_id {text!r} names no model after '{scheme}://'", field="model_id")
        if scheme == "builtin":
            from twinkle.model.builtin import build_builtin

            return build_builtin(rest, models_dir())
        if scheme == "hf":
            return _resolve_hf(rest, text)
        if scheme == "ms":
            return _resolve_ms(rest, text)
        if scheme == "file":
            return _local_dir(rest, text)
        raise InvalidInputError(
            f"unknown model id scheme {scheme!r} in {text!r}; use a local path, builtin://, hf:// or ms://",
            field="model_id",
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if _REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return _resolve_hf(text, text)
    raise NotFoundError(f"model {text!r} is not a local directory (nor a hub id like org/name)", field="model_id")


def _local_dir(path: str, model_id: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NotFoundError(f"model directory {model_id!r} does not exist", field="model_id")
    return p.resolve()


def _split_revision(repo: str, model_id: str) -> tuple[str, str | None]:
    repo, _, rev = repo.partition("@")
    if not _REPO_ID.match(repo):
        raise InvalidInputError(f"{model_id!r}: expected org/name after the scheme", field="model_id")
    return repo, rev or None


def hf_cache_dir() -> str | None:
    """The Hugging Face hub cache directory the environment names (None: huggingface_hub's default). Read at
    call time (huggingface_hub reads its env once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_offline() -> bool:
    """Hugging Face downloads are off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read at call time."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _resolve_hf(repo_spec: str, model_id: str) -> Path:
    repo, rev = _split_revision(repo_spec, model_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UnsupportedError(f"{model_id!r} needs the huggingface_hub package", field="model_id") from None
    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError) or a broken cache entry
        local_error = e
    if hub_offline():
        raise NotFoundError(
            f"model {model_id!r} is not in the Hugging Face cache ({cache or 'default location'}) and "
            f"downloads are off (HF_HUB_OFFLINE): {type(local_error).__name__}",
            field="model_id",
        )
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache))
    except Exception as e:
        raise NotFoundError(
            f"model {model_id!r} is neither in the Hugging Face cache ({cache or 'default location'}) nor "
            f"downloadable: {type(e).__name__}: {e}",
            field="model_id",
        ) from None


def _resolve_ms(repo_spec: str, model_id: str) -> Path:
    repo, rev = _split_revision(repo_spec, model_id)
    try:
        from modelscope import snapshot_download  # type: ignore[import-not-found]
    except ImportError:
        raise UnsupportedError(
            f"{model_id!r} needs the optional ModelScope client: pip install modelscope", field="model_id"
        ) from None
    kwargs: dict[str, Any] = {"revision": rev} if rev else {}
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kwargs))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, **kwargs))
    except Exception as e:
        raise NotFoundError(
            f"model {model_id!r} is neither in the ModelScope cache nor downloadable: {type(e).__name__}: {e}",
            field="model_id",
        ) from None


# -- tokenizers ----------------------------------------------------------------------------------------


def load_tokenizer(model_id: str | os.PathLike[str], backend: str = "auto") -> Any:
    """The tokenizer of ``model_id``.

    ``backend``: ``"transformers"`` (``AutoTokenizer``; imports torch), ``"tokenizers"`` (a
    ``LightTokenizer``: only the ``tokenizers`` package, no torch) or ``"auto"`` (transformers when
    installed, else the light one). Both offer ``encode``, ``decode``, ``apply_chat_template``,
    ``chat_template``, ``eos_token_id``, ``pad_token_id``; for the builtin models they give identical ids.
    A ``builtin://`` id builds only the tokenizer (no weights) unless the model is already built.
    """
    if backend not in ("auto", "transformers", "tokenizers"):
        raise InvalidInputError("backend must be 'auto', 'transformers' or 'tokenizers'", field="backend")
    text = str(model_id).strip() if isinstance(model_id, (str, os.PathLike)) else ""
    if text.startswith("builtin://") and text != "builtin://":
        from twinkle.model.builtin import build_builtin_tokenizer  # no weights needed for a tokenizer

        path = build_builtin_tokenizer(text.split("://", 1)[1], models_dir())
    else:
        path = resolve_model(model_id)
    if backend in ("auto", "transformers"):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            if backend == "transformers":
                raise UnsupportedError("backend='transformers' needs transformers installed", field="backend") from None
        else:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return LightTokenizer.from_pretrained(path)


class LightTokenizer:
    """A small HF-like tokenizer over ``tokenizer.json`` (the ``tokenizers`` package; no torch).

    Special tokens and the chat template come from ``tokenizer_config.json`` (or ``chat_template.jinja``).
    Chat templates render with jinja2 when installed; without it only the ChatML template is supported.
    """

    def __init__(self, tokenizer: Any, config: Mapping[str, Any] | None = None, chat_template: str | None = None):
        self._tok = tokenizer
        cfg = dict(config or {})
        self.chat_template: str | None = chat_template or cfg.get("chat_template")
        self.eos_token: str | None = _token_text(cfg.get("eos_token"))
        self.pad_token: str | None = _token_text(cfg.get("pad_token"))
        self.bos_token: str | None = _token_text(cfg.get("bos_token"))
        self.model_max_length = int(cfg.get("model_max_length") or 0) or None
        self.name_or_path = ""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> LightTokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UnsupportedError("the light tokenizer needs the 'tokenizers' package", field="backend") from None
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise NotFoundError(f"{str(folder)!r} has no tokenizer.json", field="model_id")
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        tmpl_path = folder / "chat_template.jinja"
        tmpl = tmpl_path.read_text(encoding="utf-8") if tmpl_path.is_file() else None
        tok = cls(Tokenizer.from_file(str(tj)), cfg, tmpl)
        tok.name_or_path = str(folder)
        return tok

    # -- ids <-> text --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self._tok.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    # -- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        from twinkle.data.chat import CHATML_TEMPLATE, check_messages, render_chatml

        msgs = check_messages(messages)
        template = self.chat_template or CHATML_TEMPLATE
        try:
            import jinja2.sandbox
        except ImportError:
            if template != CHATML_TEMPLATE:
                raise UnsupportedError("rendering this chat template needs jinja2 installed",
                                       field="chat_template") from None
            text = render_chatml(msgs, add_generation_prompt)
        else:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            text = env.from_string(template).render(
                messages=msgs, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token,
                bos_token=self.bos_token, pad_token=self.pad_token, **kwargs,
            )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"LightTokenizer(name_or_path={self.name_or_path!r}, vocab={len(self)})"


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, Mapping):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _raise_template_error(message: str) -> None:
    raise InvalidInputError(f"chat template error: {message}", field="messages")


__all__ = ["LightTokenizer", "SCHEMES", "hf_cache_dir", "hub_offline", "load_tokenizer", "models_dir", "resolve_model",
           "twinkle_home"]
