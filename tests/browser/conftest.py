from __future__ import annotations

import sys
from pathlib import Path

# share the Jupyter-server launcher with tests/extension
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extension"))
