"""The work of the gateway service that crosses its state registries, one module per concept, composed by the
facade :class:`twinkle.server.service.Service`:

* :mod:`.context` — what every part shares: the config, the workers, the registries of
  :mod:`twinkle.server.state`, the futures spawned for queued work, usage metering;
* :mod:`.leases` — sessions and their leases: the reaper that ends lapsed sessions (checkpoint and unload);
* :mod:`.run_lifecycle` — creating a run (fresh or from a checkpoint), unloading and deleting it;
* :mod:`.training` — training operations: submit, exactly-once seq ids, back-pressure, validation;
* :mod:`.saving` — saving and loading a run's checkpoints;
* :mod:`.sampling` — samplers and sample requests;
* :mod:`.info` — what the server tells about itself (capabilities, status).
"""
