"""The mock backend: a small numpy language model that really learns (no torch needed).

``MockBackend`` implements ``twinkle.model.base.Backend``; ``ByteTokenizer`` is its HF-compatible tokenizer.
"""

from .backend import PRESETS, MockBackend
from .tokenizer import ByteTokenizer

__all__ = ["PRESETS", "ByteTokenizer", "MockBackend"]
