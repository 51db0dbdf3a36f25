"""Shadows ``pandas`` in the server's Ray processes (``PYTHONPATH`` set by the launcher).

Ray Serve imports pandas at startup in every Serve process (controller, proxies, replicas) only to register a
JSON encoder for ``DataFrame`` responses, ~0.2 s of CPU per process; Serve treats it as optional. The server
never returns DataFrames and none of its code uses pandas (the notebook widgets that do run in the client).
"""

raise ImportError("pandas is disabled in Twinkle server processes (see twinkle/server/_lean_site)")
