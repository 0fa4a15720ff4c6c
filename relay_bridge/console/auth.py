"""Console sessions: a signed cookie (HMAC-SHA256 with a key made at start) naming the admin and its expiry.

The key lives only in memory: a restart signs everyone out, and nothing secret is stored. The cookie is
HttpOnly and SameSite=Strict (a read-only console with no state-changing form but sign-in/out), and
Secure whenever the console is served over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

COOKIE = "relay_console"


class SessionSigner:
    def __init__(self, lifetime_s: float, key: bytes | None = None) -> None:
        self.lifetime_s = lifetime_s
        self._key = key or secrets.token_bytes(32)

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        payload = f"{base64.urlsafe_b64encode(name.encode()).decode()}.{expires}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, cookie: str | None, now: float | None = None) -> str | None:
        """The admin name in a valid, unexpired cookie, else None."""
        if not cookie or len(cookie) > 512:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        encoded, _, expires = payload.partition(".")
        try:
            if int(expires) < (time.time() if now is None else now):
                return None
            return base64.urlsafe_b64decode(encoded.encode()).decode()
        except ValueError:
            return None
