"""Signed image links: a link that loads in a browser's `<img>`, a chat client's Markdown or a
download, with no header, while keys are on.

A signed link is the image's path with `expires` (Unix seconds), `owner` (the key name that was
handed it) and `signature`: the HMAC-SHA256, with the server's link secret, of the path, the
owner and the expiry. The secret is `serving.url_secret` (T2I_URL_SECRET) or one made at random
once and kept in the database (Store.shared_secret), so every replica signs and checks alike and
links survive restarts. Whoever holds a link may load that one image until it expires (it was
handed to the image's owner, after the owner check); an altered or expired link is a 403.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from t2i_task.api.errors import ApiError

IMAGE_PATHS = ("/api/v1/generative-process/file/", "/api/v1/generative-process/image/")
SECRET_NAME = "image-links"


def is_signed_image_request(path: str, query_string: bytes) -> bool:
    """A request the key check lets through to its route, which checks the signature (ApiKeyMiddleware)."""
    return path.startswith(IMAGE_PATHS) and b"signature=" in query_string


class LinkSigner:
    def __init__(self, secret: str, lifetime_s: float, public_url: str | None = None) -> None:
        self.secret = secret.encode()
        self.lifetime_s = lifetime_s
        self.public_url = public_url.rstrip("/") if public_url else None

    def _signature(self, path: str, owner: str, expires: int) -> str:
        message = f"{path}\n{owner}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def link(self, base_url: str, path: str, owner: str, now: float | None = None) -> str:
        """The absolute link to `path` for `owner`, valid for the configured lifetime from `now`."""
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        query = urlencode({"expires": expires, "owner": owner, "signature": self._signature(path, owner, expires)})
        return f"{self.public_url or base_url.rstrip('/')}{path}?{query}"

    def check(self, path: str, query: QueryParams) -> None:
        """403 unless the query signs `path` and has not expired."""
        try:
            expires = int(query.get("expires", ""))
        except ValueError:
            raise ApiError(403, "This image link is not valid: its expiry is missing or altered.") from None
        expected = self._signature(path, query.get("owner", ""), expires)
        if not hmac.compare_digest(expected, query.get("signature", "")):
            raise ApiError(403, "This image link is not valid: it was altered or signed by another server.")
        if expires < time.time():
            raise ApiError(403, "This image link has expired: ask for the image again for a new link.")
