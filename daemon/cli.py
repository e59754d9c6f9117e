"""The `edgetune` command: prune_core's commands plus the daemon's `serve`, and its clients
`status`, `watch` and `demo`.

Building the parser imports neither torch nor the daemon: each command's arguments and code are
imported when that command runs, so `edgetune --help`, `status` and `watch` start fast."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Sequence

from prune_core import cli as core_cli
from prune_core.errors import UsageError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> None:
    import uvicorn

    from .api import create_app
    from .ops.config import ConfigError, load_settings
    from .ops.logs import configure_logging
    from .runtime import Runtime, StartupError
    from .service import loop_factory, run, serve

    configure_logging(args.log_level)
    try:
        settings = load_settings(state_dir=args.state_dir, host=args.host, port=args.port)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not _is_loopback(settings.host) and settings.api_token is None:
        raise UsageError(f"binding {settings.host} (not loopback) requires api_token (EDGETUNE_API_TOKEN or config.toml)")
    try:
        runtime = Runtime(settings, Path(args.model) if args.model else None)
    except StartupError as exc:
        raise UsageError(str(exc)) from None
    app = create_app(runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False, log_config=None)
    run(serve(config, runtime), loop_factory(config))


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="default /var/lib/edgetune or EDGETUNE_STATE_DIR")
    p.add_argument("--model", default=None, help="model directory to import when the state dir has none")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _status_arguments(p: argparse.ArgumentParser) -> None:
    from .clients.status import add_status_arguments

    add_status_arguments(p)


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    from .clients.status import add_watch_arguments

    add_watch_arguments(p)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .clients.demo import add_arguments

    add_arguments(p)


def add_daemon_commands(sub) -> None:
    """`serve`, `status`, `watch` and `demo` on the `edgetune` subparsers (see core_cli.build_parser)."""
    core_cli.add_command(sub, "serve", "run the daemon: serve, buffer, prune-retrain cycles, hot-swap", _serve_arguments, cmd_serve)
    core_cli.add_command(sub, "status", "show the running daemon's model, buffer, gate, telemetry and cycle", _status_arguments)
    core_cli.add_command(sub, "watch", "follow the current (or next) cycle with progress bars until it ends", _watch_arguments)
    core_cli.add_command(sub, "demo", "the live demo: train, serve, stream a 3-class camera, watch the daemon specialise and swap",
                         _demo_arguments)


def build_parser() -> argparse.ArgumentParser:
    return core_cli.build_parser(add_daemon_commands)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(core_cli.run(argv, build_parser()))


if __name__ == "__main__":
    main()
