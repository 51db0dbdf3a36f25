"""The HF transformers backend: one base model, many LoRA adapters, mixed-adapter batches."""

from .backend import TransformersBackend

__all__ = ["TransformersBackend"]
