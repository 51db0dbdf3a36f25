"""``twinkle/self_host/multi_modal.py`` against a hosted Twinkle server: only the URL, key and model differ, taken
from the environment (see ``cookbook/client/_hosted.py``; set ``TWINKLE_BASE_MODEL`` to a vision-language model
the server hosts, e.g. ``Qwen/Qwen3-VL-2B-Instruct``). Flags as for the self_host script."""
from pathlib import Path
from runpy import run_path

run_path(str(Path(__file__).resolve().parents[2] / "_hosted.py"), {"SCRIPT": __file__}, "__main__")
