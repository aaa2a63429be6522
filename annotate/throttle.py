"""Login throttling: a few failed logins for one name or from one address pause further attempts.

`LoginThrottle` is the bookkeeping (pure, with the clock passed in, so it is tested by hand);
`LoginThrottleMiddleware` puts it in front of Gradio's `POST /login` as plain ASGI middleware:

- a login refused for a name or an address that has failed `max_failures` times within `window_s`
  seconds is answered `429 Too Many Requests` with a `Retry-After` header and a message that says
  how long to wait, for `lockout_s` seconds, before the password is even checked (so the right
  password during a lockout is refused too: otherwise the lockout would leak which guess was right);
- a failed login (Gradio answers 400) counts against both the name and the address;
- a successful login clears the name's failures, not the address's (an attacker with one valid
  account cannot reset the count of the address they guess from);
- memory is bounded: at most `max_keys` names and addresses are remembered, the oldest dropped first.

The counts live in the process. With several app workers behind a proxy each worker counts its own,
so an attacker gets at most `max_failures` × workers guesses per window. The address is the
connection's peer as uvicorn reports it; behind a reverse proxy on the same machine uvicorn takes
it from `X-Forwarded-For` (it trusts 127.0.0.1 by default), so each client is counted on its own.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

LOGIN_PATHS = ("/login",)
MAX_FORM_BYTES = 64 * 1024
# Gradio's login page shows nothing for a 429, and its `head=` scripts arrive only after login, so the
# middleware puts this into the page itself: it shows the server's message (as text) when a login is refused.
LOGIN_NOTICE_JS = b"""<script>
(() => {
  const send = window.fetch;
  window.fetch = async (...args) => {
    const r = await send(...args);
    const url = String((args[0] && args[0].url) || args[0]);
    if (r.status === 429 && /\/login\/?$/.test(url)) {
      let note = document.getElementById('sp-login-notice');
      if (!note) {
        note = document.createElement('div');
        note.id = 'sp-login-notice';
        note.setAttribute('role', 'alert');
        note.style.cssText = 'position:fixed;top:1em;left:50%;transform:translateX(-50%);padding:.6em 1em;' +
                             'background:#fee;color:#600;border:1px solid #c00;border-radius:4px;z-index:1000';
        document.body.appendChild(note);
      }
      try { note.textContent = (await r.clone().json()).detail; } catch (e) { note.textContent = 'Too many failed logins. Try again later.'; }
    }
    return r;
  };
})();
</script>"""


@dataclass
class LoginThrottle:
    """Failed logins per name and per address within a sliding window, and the pauses they earned."""

    max_failures: int = 5
    window_s: float = 60.0
    lockout_s: float = 300.0
    max_keys: int = 100_000
    _failures: OrderedDict = field(default_factory=OrderedDict, repr=False)  # key -> deque of failure times
    _locked_until: dict = field(default_factory=dict, repr=False)  # key -> time
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.max_failures < 1 or self.window_s <= 0 or self.lockout_s < 0:
            raise ValueError(f"login throttle: max_failures ≥ 1, window_s > 0 and lockout_s ≥ 0, not {self.max_failures}, "
                             f"{self.window_s}, {self.lockout_s}")  # fmt: skip

    @staticmethod
    def keys(name: str, address: str | None) -> list[tuple[str, str]]:
        return [("name", name.strip().lower())] + ([("address", address)] if address else [])

    def wait(self, name: str, address: str | None, now: float | None = None) -> float:
        """Seconds until `name` from `address` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return max([0.0] + [self._locked_until.get(k, 0.0) - now for k in self.keys(name, address)])

    def record(self, name: str, address: str | None, success: bool, now: float | None = None) -> None:
        """Count one login's outcome."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if success:
                self._failures.pop(self.keys(name, None)[0], None)
                return
            for key in self.keys(name, address):
                times = self._failures.pop(key, None) or deque()
                while times and times[0] <= now - self.window_s:
                    times.popleft()
                times.append(now)
                self._failures[key] = times  # most recent last
                if len(times) >= self.max_failures:
                    self._locked_until[key] = now + self.lockout_s
                    times.clear()
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
            if len(self._locked_until) > self.max_keys:
                self._locked_until = {k: t for k, t in self._locked_until.items() if t > now}


class LoginThrottleMiddleware:
    """ASGI middleware: `LoginThrottle` in front of `POST /login` (see the module docstring)."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in ("/", ""):
            return await self.app(scope, receive, _with_login_notice(send))
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") not in LOGIN_PATHS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                return await _json(send, 413, {"detail": f"login form larger than {MAX_FORM_BYTES} bytes"})
        name = await _form_username(scope, body)
        address = (scope.get("client") or (None,))[0]
        wait = self.throttle.wait(name, address)
        if wait > 0:
            seconds = math.ceil(wait)
            detail = f"Too many failed logins for this name or from this address. Try again in {seconds} s."
            return await _json(send, 429, {"detail": detail}, [(b"retry-after", str(seconds).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] in (200, 400):
                self.throttle.record(name, address, success=message["status"] == 200)
            await send(message)

        await self.app(scope, replay, watch)


def _with_login_notice(send):
    """A `send` that puts LOGIN_NOTICE_JS at the start of an HTML page's <head> (other responses pass unchanged)."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if not headers.get(b"content-type", b"").startswith(b"text/html") or headers.get(b"content-encoding"):
                start = None
                return await send(message)
            start = message
            return None
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        page = b"".join(chunks)
        at = page.find(b"<head>")
        page = page[: at + 6] + LOGIN_NOTICE_JS + page[at + 6 :] if at >= 0 else page
        headers = [(k, str(len(page)).encode() if k == b"content-length" else v) for k, v in start.get("headers", [])]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": page})

    return wrapped


async def _form_username(scope, body: bytes) -> str:
    """The `username` field of a login form (multipart or urlencoded), as Gradio reads it."""
    from starlette.requests import Request

    sent = False

    async def once():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive=once).form()
        return str(form.get("username") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed form counts under the empty name; Gradio then refuses it
        return ""


async def _json(send, status: int, payload: dict, headers: list | None = None) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})
