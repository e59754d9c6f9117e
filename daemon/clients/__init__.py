"""The daemon's clients: they only talk to a running daemon over its HTTP API (`http`):
`edgetune status` / `watch` (`status`) and `edgetune demo` (`demo`)."""
