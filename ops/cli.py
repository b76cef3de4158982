"""The `megacity` command: run the mesh locally, serve one service, migrate the database, verify the audit trail,
generate code, check.

Each subcommand is a thin shell over the module that does the work; imports are deferred so that
`megacity serve auth` loads only what a service needs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence


def _gen(args: argparse.Namespace) -> int:
    from ops import codegen
    from services.runtime.catalog import CatalogError

    try:
        if args.check:
            stale = codegen.stale()
            if stale:
                print("generated code is stale; run `./megacity gen`:", *stale, sep="\n  ", file=sys.stderr)
                return 1
            print("generated code is fresh")
            return 0
        codegen.generate()
    except (CatalogError, codegen.GenerationError) as error:
        print(f"megacity gen: {error}", file=sys.stderr)
        return 1
    print("regenerated: " + ", ".join(str(path) for _, path, _ in codegen.GENERATORS))
    return 0


def _check(args: argparse.Namespace) -> int:
    from ops import check

    return check.run(pytest_args=args.pytest_args)


def _serve(args: argparse.Namespace) -> int:
    # gRPC core logs (e.g. every failed TLS handshake) are not JSON; keep only its errors unless asked.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from services.runtime import server
    from services.runtime.catalog import CatalogError
    from services.runtime.config import ConfigError

    try:
        return asyncio.run(server.serve_from_environment(args.service))
    except (CatalogError, ConfigError) as error:
        print(f"megacity serve: {error}", file=sys.stderr)
        return 2


def _up(args: argparse.Namespace) -> int:
    from ops import supervisor

    return supervisor.up(detach=args.detach, timeout=args.timeout)


def _down(args: argparse.Namespace) -> int:
    from ops import supervisor

    return supervisor.down(timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    from ops import supervisor

    return supervisor.status(as_json=args.json)


def _supervise(args: argparse.Namespace) -> int:
    from ops import supervisor

    return supervisor.supervise()


def _db(args: argparse.Namespace) -> int:
    from ops import migrations

    return migrations.command(args.action, database_url=args.database_url)


def _audit(args: argparse.Namespace) -> int:
    from ops import audit

    return audit.command(args.zone, database_url=args.database_url)


def _seed(args: argparse.Namespace) -> int:
    from ops import seed

    return seed.command(args.database_url, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacity", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    up = commands.add_parser("up", help="start PostgreSQL, Redis, the dev PKI and every service; wait until SERVING")
    up.add_argument("--detach", action="store_true", help="return once everything is healthy; stop with `down`")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING (default 120)")
    up.set_defaults(handler=_up)

    down = commands.add_parser("down", help="stop everything `up` started, services first")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a clean stop (default 60)")
    down.set_defaults(handler=_down)

    status = commands.add_parser(
        "status", help="each service's address, identity and health; exit 0 only if all SERVING"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    serve = commands.add_parser("serve", help="run one service in the foreground, as a container would")
    serve.add_argument("service", help="a service name from mesh/catalog.yaml")
    serve.set_defaults(handler=_serve)

    supervise = commands.add_parser("supervise", help=argparse.SUPPRESS)
    supervise.set_defaults(handler=_supervise)

    db = commands.add_parser("db", help="database migrations (db/)")
    db.add_argument("action", choices=["migrate", "rollback", "status"], help="apply all / undo the last / list")
    db.add_argument(
        "--database-url",
        default=None,
        help="owner connection URL (default: MEGACITY_DATABASE_ADMIN_URL, "
        "then MEGACITY_DATABASE_URL, then the local embedded PostgreSQL)",
    )
    db.set_defaults(handler=_db)

    audit = commands.add_parser("audit", help="the audit trail: verify its hash chains")
    audit.add_argument(
        "action", choices=["verify"], help="report each zone's first broken link; exit 1 if any, 2 if unreadable"
    )
    audit.add_argument("--zone", default=None, help="verify only this zone (default: every zone with records)")
    audit.add_argument("--database-url", default=None, help="owner connection URL (default: as for `db`)")
    audit.set_defaults(handler=_audit)

    seed = commands.add_parser("seed", help="demo data on a running mesh: an org, accounts, an item bank, an exam")
    seed.add_argument("--demo", action="store_true", required=True, help="the demo organisation in zone univ")
    seed.add_argument("--json", action="store_true", help="print accounts, passwords and ids as JSON")
    seed.add_argument("--database-url", default=None, help="owner connection URL (default: as for `db`)")
    seed.set_defaults(handler=_seed)

    gen = commands.add_parser("gen", help="regenerate code and manifests from proto/ and mesh/catalog.yaml")
    gen.add_argument("--check", action="store_true", help="fail if anything generated is stale")
    gen.set_defaults(handler=_gen)

    check = commands.add_parser(
        "check",
        help="what CI runs: ruff, mypy --strict, buf lint/breaking, freshness, pytest (extra arguments go to pytest)",
    )
    check.set_defaults(handler=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "check":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pytest_args = extra if args.command == "check" else []
    sys.exit(args.handler(args))


if __name__ == "__main__":
    main()
