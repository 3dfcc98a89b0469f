"""The `sovereign` command: serve, demo, mock-upstream, check-config, tenants, keys."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from proxy.core.logs import configure_logging
from proxy.core.settings import ConfigError, Settings, load_settings


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), overrides=overrides)
    except ConfigError as exc:
        print(f"sovereign: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    server: dict[str, Any] = {}
    if args.workers is not None:
        server["workers"] = args.workers
    if args.worker_port is not None:
        server["port"] = args.worker_port  # the supervisor resolved `port: 0` once for all workers
    settings = _load(args, {"server": server} if server else None)
    from proxy.web.workers import WorkerRole, become_worker, check_workers, supervise

    try:
        check_workers(settings)
    except ConfigError as exc:
        print(f"sovereign: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging.level)
    if args.worker_index is None and settings.server.workers > 1:
        try:
            return supervise(settings, args.config)
        except ConfigError as exc:
            print(f"sovereign: {exc}", file=sys.stderr)
            return 2
    from proxy.web.server import serve

    role = None
    if args.worker_index is not None:
        role = WorkerRole(args.worker_index, args.worker_ready_fd)
        become_worker(role)
    try:
        serve(settings, worker=role)
    except ConfigError as exc:  # found while building the gateway (a unit's resources, e.g. store.spool_dir)
        print(f"sovereign: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    # Building the pipeline validates every unit's settings too.
    try:
        from proxy.core.gateway import Gateway
        from proxy.web.workers import check_workers

        check_workers(settings)
        Gateway(settings)
    except ConfigError as exc:
        print(f"sovereign: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(settings.masked(), sort_keys=False), end="")
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from proxy.devtools.mock_upstream import options_from_args, run_mock_upstream

    run_mock_upstream(args.host, args.port, options_from_args(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.devtools.demo import run_demo

    return run_demo(args)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from proxy.core.reference import config_reference

    print(config_reference())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sovereign", description="OpenAI-compatible multi-tenant metered gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $SOVEREIGN_CONFIG, else the shipped default)")
    serve.add_argument(
        "--workers", metavar="N", help="processes serving the port together, or `auto` (one per CPU); sets server.workers"
    )
    # How the supervisor starts each worker; not for people.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="print the effective config with secrets masked")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)

    reference = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    reference.set_defaults(func=cmd_config_reference)

    from proxy.devtools.mock_upstream import add_cli_arguments

    mock = sub.add_parser("mock-upstream", help="run the simulated chat-completions provider")
    add_cli_arguments(mock)
    mock.set_defaults(func=cmd_mock_upstream)

    demo = sub.add_parser("demo", help="simulated provider + gateway + demo tenant, on one machine")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--upstream-port", type=int, default=9100, help="simulated provider port (default 9100)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.set_defaults(func=cmd_demo)

    try:
        from proxy.admin.manage import add_management_commands
    except ImportError:  # tenants/keys commands arrive with the admin layer
        pass
    else:
        add_management_commands(sub, _load)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
