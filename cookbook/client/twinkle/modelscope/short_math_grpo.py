"""The self_host/short_math_grpo.py job against a ModelScope-hosted Twinkle service: only the URL, key and model differ,
taken from MODELSCOPE_TWINKLE_URL / MODELSCOPE_API_TOKEN / MODELSCOPE_TWINKLE_MODEL."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

os.environ["TWINKLE_SERVER_URL"] = os.environ.get("MODELSCOPE_TWINKLE_URL", "https://www.modelscope.cn/twinkle")
os.environ["TWINKLE_API_KEY"] = os.environ.get("MODELSCOPE_API_TOKEN", "")
os.environ.setdefault("TWINKLE_MODEL", os.environ.get("MODELSCOPE_TWINKLE_MODEL", "Qwen/Qwen3-0.6B"))

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).parents[1] / "self_host" / "short_math_grpo.py"), run_name="__main__")
