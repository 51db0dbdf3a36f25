"""A byte-level tokenizer in pure Python with the parts of the HF tokenizer API that ``twinkle.data`` uses.

Ids 0..255 are the UTF-8 bytes; then come the special tokens. The chat template is ChatML:
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and ``<|im_start|>assistant\\n`` as the
generation prompt. ``eos_token`` is ``<|im_end|>`` (the end of an assistant turn), as in Qwen2 chat models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, overload

from twinkle.types import InvalidInputError

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

# The same template written in Jinja, for tools that read ``tokenizer.chat_template``.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes plus ChatML special tokens. Vocabulary size ``256 + 4 + extra_tokens``."""

    name_or_path = "mock://byte"
    padding_side = "right"
    bos_token: str | None = None
    bos_token_id: int | None = None
    chat_template = CHAT_TEMPLATE

    def __init__(self, model_max_length: int = 1024, extra_tokens: int = 0) -> None:
        """``extra_tokens`` appends reserved special tokens ``<|extra_K|>`` (for larger mock vocabularies)."""
        self.model_max_length = model_max_length
        self._specials = SPECIAL_TOKENS + tuple(f"<|extra_{k}|>" for k in range(extra_tokens))
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(self._specials)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._specials) + ")")

    # -- vocabulary --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return 256 + len(self._specials)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token(self) -> str:
        return "<|im_end|>"

    @property
    def eos_token_id(self) -> int:
        return self._special_to_id["<|im_end|>"]

    @property
    def pad_token(self) -> str:
        return "<|pad|>"

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id["<|pad|>"]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._specials)

    @property
    def all_special_ids(self) -> list[int]:
        return [self._special_to_id[t] for t in self._specials]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {"eos_token": self.eos_token, "pad_token": self.pad_token}

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._byte_name(i): i for i in range(256)}
        vocab.update(self._special_to_id)
        return vocab

    @staticmethod
    def _byte_name(i: int) -> str:
        return chr(i) if 33 <= i < 127 else f"<0x{i:02X}>"

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int: ...
    @overload
    def convert_tokens_to_ids(self, tokens: list[str] | tuple[str, ...]) -> list[int]: ...
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self._special_to_id:
            return self._special_to_id[token]
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        if m:
            return int(m.group(1), 16)
        data = token.encode("utf-8")
        if len(data) != 1:
            raise InvalidInputError(f"{token!r} is not a single token of the byte tokenizer", field="tokens")
        return data[0]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, i: int) -> str:
        if i in self._id_to_special:
            return self._id_to_special[i]
        self._check_id(i)
        return self._byte_name(i)

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise InvalidInputError(f"token id {i} is outside the vocabulary (size {self.vocab_size})", field="ids")

    # -- text <-> ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Bytes of ``text``; special-token strings inside it become their ids (as HF tokenizers do)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a string, got {type(text).__name__}", field="text")
        ids: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            if part in self._special_to_id:
                ids.append(self._special_to_id[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        seq: Any = [ids] if isinstance(ids, int) else ids
        if hasattr(seq, "tolist"):
            seq = seq.tolist()  # numpy arrays
        out: list[str] = []
        buf = bytearray()
        for raw in seq:
            i = int(raw)
            if i in self._id_to_special:
                if buf:
                    out.append(buf.decode("utf-8", errors="replace"))
                    buf = bytearray()
                if not skip_special_tokens:
                    out.append(self._id_to_special[i])
                continue
            self._check_id(i)
            buf.append(i)
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False, **kw: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        if isinstance(text, str):
            ids = self.encode(text)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        encoded = [self.encode(t) for t in text]
        return {"input_ids": encoded, "attention_mask": [[1] * len(e) for e in encoded]}

    # -- chat ------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        tools: Any = None,
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        continue_final_message: bool = False,
        **_: Any,
    ) -> Any:
        """Render ChatML. ``tokenize=False`` gives the text; ``return_dict=True`` gives
        ``{"input_ids", "attention_mask"}`` (plus ``assistant_masks`` when asked), like HF."""
        pieces: list[tuple[str, bool]] = []  # (text, is assistant content)
        messages = list(conversation)
        for n, message in enumerate(messages):
            role, content = _role_content(message, n)
            pieces.append((f"<|im_start|>{role}\n", False))
            last = n == len(messages) - 1
            if continue_final_message and last:
                pieces.append((content, role == "assistant"))
                break
            pieces.append((content + "<|im_end|>", role == "assistant"))
            pieces.append(("\n", False))
        if add_generation_prompt and not continue_final_message:
            pieces.append(("<|im_start|>assistant\n", False))
        text = "".join(p for p, _ in pieces)
        if not tokenize:
            return text
        ids: list[int] = []
        mask: list[int] = []
        for piece, is_assistant in pieces:
            enc = self.encode(piece)
            ids.extend(enc)
            mask.extend([int(is_assistant)] * len(enc))
        if not return_dict:
            return ids
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_assistant_tokens_mask:
            out["assistant_masks"] = mask
        return out


def _role_content(message: Any, index: int) -> tuple[str, str]:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if not isinstance(role, str) or not role:
        raise InvalidInputError(f"message {index} needs a 'role'", field=f"messages[{index}].role")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI-style content parts: keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    if not isinstance(content, str):
        raise InvalidInputError(f"message {index} content must be text", field=f"messages[{index}].content")
    return role, content
