"""Manage annotator accounts, and who labels which project.

    python -m annotate.users add NAME [--admin] [--password-stdin] --db URL
    python -m annotate.users list --db URL
    python -m annotate.users disable NAME --db URL      (and: enable, passwd)
    python -m annotate.users assign NAME PROJECT [PROJECT ...] --db URL      (and: unassign)

Passwords come from a hidden prompt, or as one line on stdin with --password-stdin (for scripts).
They are hashed with scrypt (see annotate.auth) and never stored, printed or logged in plain text.

Projects: a project nobody is assigned to is open to every annotator (a single-project server needs
no assignments). Once a project has members, only they (and admins, who see every project) find it
in the app's project picker; `unassign` takes the last member away and opens it to all again.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from annotate.auth import hash_password
from db import Annotator, Project, ProjectMember, Vote, open_db


class UserError(ValueError):
    pass


def add_user(session: Session, username: str, password: str, *, admin: bool = False) -> Annotator:
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise UserError(f"bad username {username!r}: use 1-64 characters without spaces")
    existing = session.scalar(select(Annotator).where(Annotator.username == username))
    if existing is not None and existing.password_hash is not None:
        raise UserError(f"user {username!r} exists; use `passwd` to change the password")
    hashed = hash_password(password)
    if existing is not None:  # an account made by imported votes becomes a real login
        existing.password_hash, existing.active = hashed, True
        existing.role = "admin" if admin else existing.role
        return existing
    user = Annotator(username=username, password_hash=hashed, role="admin" if admin else "annotator", active=True)
    session.add(user)
    session.flush()
    return user


def _get(session: Session, username: str) -> Annotator:
    user = session.scalar(select(Annotator).where(Annotator.username == username))
    if user is None:
        raise UserError(f"no user named {username!r}; see `python -m annotate.users list`")
    return user


def set_active(session: Session, username: str, active: bool) -> Annotator:
    user = _get(session, username)
    user.active = active
    return user


def set_password(session: Session, username: str, password: str) -> Annotator:
    user = _get(session, username)
    user.password_hash = hash_password(password)
    return user


def _project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        names = ", ".join(session.scalars(select(Project.name).order_by(Project.name))) or "none yet"
        raise UserError(f"no project named {name!r} (projects: {names})")
    return project


def assign(session: Session, username: str, project_name: str) -> bool:
    """Make `username` a member of the project; False if they already were."""
    user, project = _get(session, username), _project(session, project_name)
    if session.get(ProjectMember, (project.id, user.id)) is not None:
        return False
    session.add(ProjectMember(project_id=project.id, annotator_id=user.id))
    session.flush()
    return True


def unassign(session: Session, username: str, project_name: str) -> bool:
    """Take `username` off the project; False if they were not a member."""
    user, project = _get(session, username), _project(session, project_name)
    member = session.get(ProjectMember, (project.id, user.id))
    if member is None:
        return False
    session.delete(member)
    session.flush()
    return True


def members(session: Session, project_name: str) -> list[str]:
    project = _project(session, project_name)
    query = select(Annotator.username).join(ProjectMember, ProjectMember.annotator_id == Annotator.id)
    return list(session.scalars(query.where(ProjectMember.project_id == project.id).order_by(Annotator.username)))


def visible_projects(session: Session, user: Annotator) -> list[Project]:
    """The projects `user` may label, newest first: all for admins; otherwise the ones they are assigned
    to and the ones nobody is assigned to."""
    query = select(Project).order_by(Project.id.desc())
    if user.role != "admin":
        has_members = select(ProjectMember.project_id).distinct()
        mine = select(ProjectMember.project_id).where(ProjectMember.annotator_id == user.id)
        query = query.where(Project.id.in_(mine) | Project.id.not_in(has_members))
    return list(session.scalars(query))


def may_label(session: Session, user: Annotator, project: Project) -> bool:
    if user.role == "admin" or session.get(ProjectMember, (project.id, user.id)) is not None:
        return True
    return session.scalar(select(ProjectMember.annotator_id).where(ProjectMember.project_id == project.id).limit(1)) is None


def list_users(session: Session) -> list[tuple[Annotator, int]]:
    votes = func.count(Vote.id).filter(Vote.active)
    return list(
        session.execute(
            select(Annotator, votes).outerjoin(Vote, Vote.annotator_id == Annotator.id).group_by(Annotator.id).order_by(Annotator.username)
        ).tuples()
    )


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UserError("--password-stdin: no line on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise UserError("the passwords differ")
    return first


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m annotate.users", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $STORYPREF_DB or sqlite:///data/storypref.db)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create an account")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see the admin page and export")
    add.add_argument("--password-stdin", action="store_true", help="read the password as one line on stdin")
    pw = sub.add_parser("passwd", help="set a new password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password as one line on stdin")
    sub.add_parser("list", help="list accounts with their vote counts")
    for name, text in (("disable", "block a login (votes are kept)"), ("enable", "allow a disabled login again")):
        sub.add_parser(name, help=text).add_argument("name")
    for name, text in (("assign", "let NAME label these projects (the first member closes a project to everyone else)"),
                       ("unassign", "take NAME off these projects (a project left without members is open to all)")):  # fmt: skip
        sp = sub.add_parser(name, help=text)
        sp.add_argument("name")
        sp.add_argument("projects", nargs="+", metavar="PROJECT")
    for sp in sub.choices.values():  # accept --db after the sub-command too
        sp.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _, session_factory = open_db(args.db)
        with session_factory.begin() as session:
            if args.command == "add":
                user = add_user(session, args.name, _read_password(args.password_stdin), admin=args.admin)
                print(f"added {user.role} {user.username!r}")
            elif args.command == "passwd":
                set_password(session, args.name, _read_password(args.password_stdin))
                print(f"password changed for {args.name!r}")
            elif args.command in ("disable", "enable"):
                set_active(session, args.name, args.command == "enable")
                print(f"{args.command}d {args.name!r}")
            elif args.command in ("assign", "unassign"):
                change = assign if args.command == "assign" else unassign
                for project in args.projects:
                    changed = change(session, args.name, project)
                    now = members(session, project)
                    state = f"members: {', '.join(now)}" if now else "no members: open to every annotator"
                    done = {("assign", True): "added to", ("assign", False): "already a member of",
                            ("unassign", True): "taken off", ("unassign", False): "was not a member of"}[args.command, changed]  # fmt: skip
                    print(f"{args.name!r} {done} {project!r} ({state})")
            else:
                print(f"{'username':<24} {'role':<10} {'active':<7} {'login':<6} {'votes':<7} projects")
                for user, n in list_users(session):
                    login = "yes" if user.password_hash else "no"
                    names = "all (admin)" if user.role == "admin" else ", ".join(sorted(p.name for p in visible_projects(session, user))) or "none"
                    print(f"{user.username:<24} {user.role:<10} {str(user.active):<7} {login:<6} {n:<7} {names}")
    except (UserError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
