"""Launch the storypref labeling app.

    python app.py [--db URL] [--host 127.0.0.1] [--port 7860] [--project NAME] [--no-demo]

On an empty database it seeds a storyworld demo project (50 items, with 300 votes from simulated
annotators, so the Admin tab has something to show), and on the first run with no accounts it
creates an `admin` account with a random password, printed once. It listens on 127.0.0.1 only,
unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from annotate.demo import ensure_admin, seed_demo
from annotate.scheduler import LEASE_SECONDS
from annotate.throttle import LoginThrottle
from annotate.ui import build_app, launch
from db import DEFAULT_URL, open_db


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--db", default=os.environ.get("STORYPREF_DB", DEFAULT_URL), help="SQLAlchemy URL (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 exposes it to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--project", default=None, help="project to label (default: the most recent)")
    p.add_argument("--no-demo", action="store_true", help="do not seed the storyworld demo into an empty database")
    p.add_argument("--data-dir", default="data", help="where the demo world is written (default: data/)")
    p.add_argument("--concurrency", type=int, default=16, help="events handled at once (default 16)")
    p.add_argument("--leases", choices=("auto", "db", "process"), default="auto",
                   help="where open assignments are kept: db (shared by several app workers on one database), process, or "
                        "auto: db on PostgreSQL, process on SQLite (default)")  # fmt: skip
    p.add_argument("--lease-seconds", type=float, default=LEASE_SECONDS, metavar="S",
                   help="an assignment left unanswered this long (a closed tab, a killed worker) is served again (default %(default)s)")  # fmt: skip
    p.add_argument("--login-max-failures", type=int, default=5, metavar="N",
                   help="failed logins for one name or from one address within --login-window that pause it (default 5)")
    p.add_argument("--login-window", type=float, default=60.0, metavar="S", help="seconds over which failures count (default 60)")
    p.add_argument("--login-lockout", type=float, default=300.0, metavar="S", help="seconds a paused name or address waits (default 300)")
    return p


def prepare(args: argparse.Namespace):
    """Everything before the server starts: the database, the demo on first run, the first admin, the app.

    Returns (gr.Blocks, session factory, the new admin's password or None); raises ValueError when
    the project cannot be served.
    """
    _, session_factory = open_db(args.db)
    if not args.no_demo:
        seed_demo(session_factory, Path(args.data_dir))
    password = ensure_admin(session_factory)
    demo = build_app(session_factory, args.project, concurrency_limit=args.concurrency, leases=args.leases, lease_seconds=args.lease_seconds)
    return demo, session_factory, password


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        throttle = LoginThrottle(args.login_max_failures, args.login_window, args.login_lockout)
        demo, session_factory, password = prepare(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"storypref labeling app on http://{args.host}:{args.port}  (database: {args.db})")
    if password:
        print(f"  first run: created account 'admin' with password: {password}   (shown once; change it with")
        print(f"  python -m annotate.users passwd admin --db {args.db})")
    print(f"  add annotators: python -m annotate.users add NAME --db {args.db}")
    launch(demo, session_factory, host=args.host, port=args.port, concurrency_limit=args.concurrency, login_throttle=throttle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
