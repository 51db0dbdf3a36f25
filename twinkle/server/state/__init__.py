"""The gateway's state, one module per concept, composed by :class:`twinkle.server.service.Service`.

* :mod:`.identity` — API keys (auth cache, bootstrap keys) and sessions with their leases;
* :mod:`.runs` — training runs (one LoRA adapter each): placement on replicas, step and metric bookkeeping;
* :mod:`.checkpoints` — saved checkpoints: names, paths, TTLs, publication;
* :mod:`.futures` — the results of queued work, awaited by long-polls and persisted for a while;
* :mod:`.samplers` — registered samplers (a base model, a checkpoint or a run's live weights).

Each registry owns its dicts and indexes and writes its own rows to the :class:`~twinkle.server.store.Store`;
work that crosses concepts (a lapsed lease checkpoints and unloads runs) lives in :mod:`twinkle.server.gateway`.
"""
