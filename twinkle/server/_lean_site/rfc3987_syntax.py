"""Shadows the ``rfc3987_syntax`` package in the server's Ray processes (``PYTHONPATH`` set by the launcher).

``jsonschema`` (imported by every Ray process) imports ``rfc3987_syntax`` when it is installed (JupyterLab
pulls it in) only to validate the ``iri`` string format, and building its Lark grammar costs ~1 s of CPU per
process at startup. Ray never validates that format, so the server's processes go without it: the import
fails and ``jsonschema`` skips that format checker, as when the package is not installed.
"""

raise ImportError("rfc3987_syntax is disabled in Twinkle server processes (see twinkle/server/_lean_site)")
