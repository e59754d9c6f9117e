"""The platform around the data path: settings, telemetry, logging, sd_notify, Prometheus metrics,
the /status document and the status page."""
