"""The `self_host/dpo.py` recipe against a hosted Twinkle server (e.g. on ModelScope).

Only the server URL, the API key and the model differ, all read from the environment:

    TWINKLE_SERVER_URL=https://... TWINKLE_API_KEY=... TWINKLE_BASE_MODEL=Qwen/Qwen3-0.6B \
        python cookbook/client/tinker/modelscope/dpo.py [--flags as in self_host/dpo.py]

``MODELSCOPE_SERVER_URL`` / ``MODELSCOPE_API_KEY`` / ``MODELSCOPE_MODEL`` are read too.
"""

import os
import runpy
import sys
from pathlib import Path

for ours, theirs, default in [("TWINKLE_SERVER_URL", "MODELSCOPE_SERVER_URL", None),
                              ("TWINKLE_API_KEY", "MODELSCOPE_API_KEY", None),
                              ("TWINKLE_BASE_MODEL", "MODELSCOPE_MODEL", "Qwen/Qwen3-0.6B")]:
    value = os.environ.get(ours) or os.environ.get(theirs) or default
    if value is None:
        sys.exit(f"set {ours} (or {theirs})")
    os.environ[ours] = value

runpy.run_path(str(Path(__file__).resolve().parent.parent / "self_host" / "dpo.py"), run_name="__main__")
