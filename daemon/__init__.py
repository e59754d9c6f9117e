"""edgetune daemon: serve a CNN, buffer what it sees, improve it on-device when the device is free.

The data path: api (sample in) → buffer → scheduler (gate, telemetry) → supervisor → worker
(rank → prune → retrain → validate, in prune_core) → installer (model_store, serving: hot-swap)
→ api (served). Beside it: cycle_records, recovery, backoff, events, status_view, metrics.
"""
