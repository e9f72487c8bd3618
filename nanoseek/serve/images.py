"""OpenAI ``image_url`` content parts -> images, for a server whose model has vision towers.

    policy = ImagePolicy(engine, allow_remote=False)
    img = policy.read(url, where="messages.0.content.1")     # APIError 400 naming the problem

Accepted: ``data:image/png|jpeg|webp|gif;base64,...`` URLs (the declared type must be the decoded
one), and with ``--allow-remote-images`` http(s) URLs fetched with a timeout and the same byte
limit. Everything else is a 400 that says why: a remote URL by default, another MIME type, bad
base64, a truncated or undecodable image, one over the pixel or byte limit, too many images.
Decoding and the vision towers run in the request's worker thread, never in the scheduler's.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.request
from dataclasses import dataclass, field

from ..vision.image import FORMATS, ImageError, ImageLimits, decode_image
from .protocol import APIError

DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)(;[^,]*)?,", re.ASCII)


@dataclass
class ImagePolicy:
    """What a server accepts as images, and the engine that turns them into tokens."""
    engine: object
    allow_remote: bool = False
    limits: ImageLimits = field(default_factory=ImageLimits)
    timeout: float = 10.0

    def read(self, url: str, where: str):
        """One image_url's RGB image, or an APIError 400 naming `where` and the problem."""
        try:
            return decode_image(self._bytes(url, where), self.limits, what=where)
        except ImageError as e:
            raise APIError(400, str(e), param=where, code="invalid_image") from None

    def _bytes(self, url: str, where: str) -> bytes:
        m = DATA_URL.match(url)
        if m:
            mime, params = m[1].lower(), m[2] or ""
            if mime not in FORMATS.values():
                raise ImageError(f"{where}: MIME type {mime} is not an accepted image type "
                                 f"({', '.join(sorted(FORMATS.values()))})")
            if ";base64" not in params:
                raise ImageError(f"{where}: only base64 data URLs are accepted")
            payload = url[m.end():]
            if len(payload) > self.limits.max_bytes * 4 // 3 + 4:
                raise ImageError(f"{where}: the image is over the {self.limits.max_bytes}-byte limit")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ImageError(f"{where}: the data URL is not valid base64") from None
            kind = decode_kind(data)
            if kind is not None and kind != mime:
                raise ImageError(f"{where}: declared {mime} but the data is {kind}")
            return data
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise ImageError(f"{where}: remote image URLs are refused (send a data: URL, or start the "
                                 "server with --allow-remote-images)")
            return self._fetch(url, where)
        raise ImageError(f"{where}: expected a data:image/...;base64 URL")

    def _fetch(self, url: str, where: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:  # noqa: S310 (http/https only, checked)
                data = r.read(self.limits.max_bytes + 1)
        except Exception as e:
            raise ImageError(f"{where}: could not fetch the image ({e})") from None
        if len(data) > self.limits.max_bytes:
            raise ImageError(f"{where}: the image is over the {self.limits.max_bytes}-byte limit")
        return data


MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif")]


def decode_kind(data: bytes) -> str | None:
    """The MIME type the bytes' signature says (None when unknown; decode_image then decides)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in MAGIC if data.startswith(magic)), None)
