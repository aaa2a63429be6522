"""Password hashing and checking for annotator accounts.

Passwords are hashed with scrypt (RFC 7914) from the standard library, with a random 16-byte salt
per password, and stored as `scrypt$n$r$p$salt$hash` (base64). Plain text is never stored or logged.
`authenticate(session, username, password)` is what the app's login calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import Annotator

# scrypt cost: N=2**14, r=8, p=1 is the OWASP floor (about 16 MiB and a few tens of ms per check).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def authenticate(session: Session, username: str, password: str) -> Annotator | None:
    """The active annotator with this username and password, or None."""
    user = session.scalar(select(Annotator).where(Annotator.username == username))
    if user is None or not user.active:
        # Spend the same time as a real check so usernames cannot be probed by timing.
        verify_password(password, _DUMMY_HASH)
        return None
    return user if verify_password(password, user.password_hash) else None


def random_password() -> str:
    return secrets.token_urlsafe(12)


_DUMMY_HASH = hash_password("not-a-real-password")
