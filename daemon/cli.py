"""The `edgetune` command: prune_core's commands plus `serve` (the daemon)."""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Sequence

from prune_core import cli as core_cli

from .config import ConfigError, load_settings
from .demo import add_parser as add_demo_parser
from .status_cli import add_parsers as add_status_parsers


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> None:
    import asyncio

    import uvicorn

    from .api import create_app
    from .logs import configure_logging
    from .runtime import Runtime, StartupError
    from .service import serve

    configure_logging(args.log_level)
    try:
        settings = load_settings(state_dir=args.state_dir, host=args.host, port=args.port)
    except ConfigError as exc:
        raise core_cli.UsageError(str(exc)) from None
    if not _is_loopback(settings.host) and settings.api_token is None:
        raise core_cli.UsageError(f"binding {settings.host} (not loopback) requires api_token (EDGETUNE_API_TOKEN or config.toml)")
    try:
        runtime = Runtime(settings, Path(args.model) if args.model else None)
    except StartupError as exc:
        raise core_cli.UsageError(str(exc)) from None
    app = create_app(runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False, log_config=None)
    asyncio.run(serve(config, runtime))


def build_parser():
    parser = core_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.add_parser("serve", help="run the daemon: serve, buffer, prune-retrain cycles, hot-swap")
    p.add_argument("--state-dir", default=None, help="default /var/lib/edgetune or EDGETUNE_STATE_DIR")
    p.add_argument("--model", default=None, help="model directory to import when the state dir has none")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    add_status_parsers(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(core_cli.run(argv, build_parser()))


if __name__ == "__main__":
    main()
