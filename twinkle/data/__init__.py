"""Client-side data preparation (no torch at import): chat templates, datasets, a DataLoader,
preprocessors (self-cognition, DPO pairs, arithmetic) and rewards, and ``to_datums``."""

from ._assets import assets_path
from .arithmetic import (
    arithmetic_answer,
    arithmetic_dataset,
    arithmetic_question,
    arithmetic_reward,
    extract_answer,
    is_well_formed,
)
from .chat import (
    CHATML_TEMPLATE,
    ChatEncoder,
    apply_chat_template,
    check_messages,
    encode_prompt,
    encode_text,
    render_chat,
)
from .convert import IGNORE_INDEX, loss_weight_and_tokens, to_datum, to_datums
from .dataset import Dataset, load_dataset
from .dpo import DPOPairPreprocessor, flatten_pairs
from .loader import DataLoader
from .self_cognition import (
    DEFAULT_AUTHOR,
    DEFAULT_NAME,
    SelfCognitionPreprocessor,
    identity_preference_pairs,
    load_self_cognition_raw,
    self_cognition_dataset,
)

__all__ = [
    "loss_weight_and_tokens",
    "CHATML_TEMPLATE",
    "DEFAULT_AUTHOR",
    "DEFAULT_NAME",
    "DPOPairPreprocessor",
    "ChatEncoder",
    "DataLoader",
    "Dataset",
    "IGNORE_INDEX",
    "SelfCognitionPreprocessor",
    "apply_chat_template",
    "arithmetic_answer",
    "arithmetic_dataset",
    "arithmetic_question",
    "arithmetic_reward",
    "assets_path",
    "check_messages",
    "encode_prompt",
    "encode_text",
    "extract_answer",
    "flatten_pairs",
    "is_well_formed",
    "load_dataset",
    "load_self_cognition_raw",
    "render_chat",
    "identity_preference_pairs",
    "self_cognition_dataset",
    "to_datum",
    "to_datums",
]
