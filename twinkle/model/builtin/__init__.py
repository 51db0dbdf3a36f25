"""Builtin toy models, built locally in seconds and cached (``builtin://tiny``, ``small``, ``tiny-vl``, ``small-vl``).

Each is a randomly initialised Qwen2 model (fp32 safetensors, numpy RNG with a fixed seed) with a byte-level
BPE tokenizer trained on English text bundled with the package and a ChatML chat template. They know
nothing until trained: they exist so tests, tutorials, benchmarks and the quickstart run with no download.
Building needs only ``numpy``, ``tokenizers`` and ``safetensors`` (no torch).

The cache folder name carries the builder version and a hash of the spec and training text, so a changed
package never reuses a stale build. Builds go to a temporary folder renamed into place atomically, so
several processes may build the same model at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from twinkle.types import InvalidInputError

from ._vision import VisionSpec

BUILDER_VERSION = 1
META_FILE = "twinkle_builtin.json"


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture and seed of one builtin model (Qwen2 layout)."""

    name: str
    description: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_target: int = 4096
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    seed: int = 20240601
    vision: VisionSpec | None = None  # a Qwen3-VL when set (see ``_vision``)


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        name="tiny",
        description="toy Qwen2, ~1M parameters, random init: for tests and the quickstart",
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        seed=1,
    ),
    "small": BuiltinSpec(
        name="small",
        description="toy Qwen2, ~26M parameters, random init: for benchmarks and longer demos",
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        seed=2,
    ),
    "tiny-vl": BuiltinSpec(
        name="tiny-vl",
        description="toy Qwen3-VL, ~1.4M parameters, random init: the tiny text tower with a 2-layer vision "
                    "tower (patch 8, merge 2; a 64x64 image is 16 tokens), for image tests and tutorials",
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        seed=3, vision=VisionSpec(),
    ),
    "small-vl": BuiltinSpec(
        name="small-vl",
        description="toy Qwen3-VL, ~30M parameters, random init: the small text tower with a 4-layer vision "
                    "tower (patch 16, merge 2; a 128x128 image is 16 tokens), for image demos and benchmarks",
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        seed=4, vision=VisionSpec(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, patch_size=16,
                                  num_position_embeddings=1024, deepstack_visual_indexes=(1, 3),
                                  min_pixels=32 * 32, max_pixels=512 * 512),
    ),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def _spec(name: str) -> BuiltinSpec:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown builtin model {name!r}; available: {', '.join(builtin_names())}", field="model_id"
        ) from None


def _fingerprint(spec: BuiltinSpec) -> str:
    from twinkle.data.chat import CHATML_TEMPLATE

    from ._corpus import corpus_lines

    h = hashlib.sha256()
    d = asdict(spec)
    if d.get("vision") is None:  # text models keep the hash they had before VL models existed
        d.pop("vision", None)
    h.update(json.dumps({"builder": BUILDER_VERSION, "spec": d}, sort_keys=True).encode())
    h.update(CHATML_TEMPLATE.encode())
    if spec.vision is not None:
        from ._vision import VISION_TOKENS, VL_CHAT_TEMPLATE

        h.update(VL_CHAT_TEMPLATE.encode())
        h.update(json.dumps(VISION_TOKENS).encode())
    for doc in corpus_lines():
        h.update(doc.encode())
    return h.hexdigest()[:10]


def builtin_dir_name(name: str) -> str:
    """``builtin-<name>-v<builder>-<hash of spec and text>``."""
    spec = _spec(name)
    return f"builtin-{spec.name}-v{BUILDER_VERSION}-{_fingerprint(spec)}"


def build_builtin(name: str, models_dir: str | Path) -> Path:
    """The folder of builtin model ``name`` under ``models_dir``, building it first if absent."""
    spec = _spec(name)
    final = Path(models_dir) / builtin_dir_name(name)
    return _build_atomically(final, lambda out: _build_into(spec, out))


def build_builtin_tokenizer(name: str, models_dir: str | Path) -> Path:
    """A folder holding only the tokenizer files of ``name`` (identical to the full build's), for clients
    that need the tokenizer but not the weights. Uses the full build when it is already there."""
    spec = _spec(name)
    full = Path(models_dir) / builtin_dir_name(name)
    if (full / META_FILE).is_file():
        return full
    return _build_atomically(full.with_name(full.name + "-tokenizer"), lambda out: _build_into(spec, out, weights=False))


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_into(spec: BuiltinSpec, out: Path, weights: bool = True) -> None:
    from twinkle.data.chat import CHATML_TEMPLATE

    from ._corpus import corpus_lines
    from ._tokenizer import ENDOFTEXT, IM_END, train_tokenizer, write_tokenizer
    from ._weights import write_model

    tok = train_tokenizer(corpus_lines(), spec.vocab_target)
    if spec.vision is None:
        write_tokenizer(tok, out, CHATML_TEMPLATE, spec.max_position_embeddings)
    else:
        from ._vision import VISION_TOKENS, VL_CHAT_TEMPLATE, write_preprocessor

        write_tokenizer(tok, out, VL_CHAT_TEMPLATE, spec.max_position_embeddings, extra_special=VISION_TOKENS)
        write_preprocessor(spec.vision, out)
    vocab = -(-tok.get_vocab_size() // 64) * 64  # pad the embedding to a multiple of 64
    n_params = 0
    eos_id, pad_id = tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)
    if weights and spec.vision is None:
        n_params = write_model(spec, out, vocab, eos_id=eos_id, pad_id=pad_id)
    elif weights:
        from ._vision import VISION_TOKENS, write_vl_model

        ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
        n_params = write_vl_model(spec, out, vocab, eos_id, pad_id, ids)
    meta = {
        "name": f"builtin://{spec.name}",
        "description": spec.description,
        "toy": True,
        "builder_version": BUILDER_VERSION,
        "num_parameters": n_params,
        "weights": weights,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "spec": asdict(spec),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        f"# builtin://{spec.name} (a toy)\n\n{spec.description}.\n\nRandomly initialised model built by "
        "twinkle with a fixed seed; it knows nothing until you train it. The tokenizer is a byte-level BPE "
        "trained on a few dozen KB of English text bundled with twinkle.\n"
    )


__all__ = ["BUILTIN_MODELS", "BuiltinSpec", "build_builtin", "build_builtin_tokenizer", "builtin_dir_name",
           "builtin_names"]
