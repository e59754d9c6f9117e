"""Prune-retrain cycles as the daemon runs them: when (scheduler, gate, backoff), what one may cost
(cycle_cost), whether to keep the result (acceptance), their records and reports, recovery at start-up."""
