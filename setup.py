"""Data files that only exist after the JupyterLab extension is built (``bash extension/build.sh``).

Everything else lives in pyproject.toml. Without a built extension the package still installs (the Python
side works; JupyterLab just has no Twinkle panel), so a checkout without node stays installable.
"""

from pathlib import Path

from setuptools import setup

_EXT = Path("twinkle_client/labextension")
_TARGET = "share/jupyter/labextensions/twinkle-jupyterlab"

data_files = [("etc/jupyter/jupyter_server_config.d", ["extension/jupyter-config/server-config/twinkle_client.json"])]
if (_EXT / "package.json").is_file():
    data_files.append((_TARGET, [str(_EXT / "package.json"), "extension/install.json"]))
    data_files.append((f"{_TARGET}/static", sorted(str(p) for p in (_EXT / "static").iterdir() if p.is_file())))

setup(data_files=data_files)
