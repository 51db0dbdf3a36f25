"""English text bundled for training the builtin tokenizers (original writing for this project)."""
