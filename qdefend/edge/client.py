"""The device side of ``qdefend serve``: send released int8 features, read the cloud head's answer.

Standard library (urllib) and numpy only, copied as-is into device bundles next to ``wire.py``::

    c = Client("http://cloud:8000", token="...")
    c.check_encoder(runtime)                  # the server's run exported this encoder (sha256)
    answer = c.infer(runtime.encode(images), encoder_sha256=runtime.entry["sha256"])

Every failure is a :class:`ClientError` with one line: the server's own reason for a 4xx, what
to check for a refused connection or a timeout.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

try:
    from . import wire
    from .errors import ArtifactError
except ImportError:  # copied flat into a device bundle
    import wire
    from errors import ArtifactError

__all__ = ["Client", "ClientError", "read_token"]


class ClientError(ArtifactError):
    """The server refused a request or could not be reached; the message says what to do.
    ``status``: the HTTP status of a refusal (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ClientError(f"cannot read the token file {path} ({e.strerror}): copy the server's token there") from None
    if not token:
        raise ClientError(f"the token file {path} is empty: copy the server's token there")
    return token


class Client:
    """A ``qdefend serve`` endpoint: base URL (http or https) and its bearer token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"server URL {url!r} must look like http://HOST:PORT or https://HOST:PORT")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self._manifest: dict | None = None

    def _request(self, path: str, body: bytes | None = None, ctype: str | None = None,
                 extra: dict[str, str] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if ctype:
            headers["Content-Type"] = ctype
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST" if body else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error") or e.reason
            except (ValueError, AttributeError, OSError):
                reason = e.reason
            raise ClientError(f"{self.url}{path}: HTTP {e.code}: {reason}", e.code) from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach {self.url} ({e.reason}): is `qdefend serve` running there, and the "
                              "URL right?") from None
        except (socket.timeout, TimeoutError):
            raise ClientError(f"{self.url}{path}: no answer within {self.timeout:g} s: the server is overloaded or "
                              "unreachable; retry later") from None
        except (ValueError, ConnectionError) as e:
            raise ClientError(f"{self.url}{path}: broken answer ({type(e).__name__}: {e}): retry") from None

    def manifest(self) -> dict[str, Any]:
        """``GET /v1/manifest`` (cached)."""
        if self._manifest is None:
            self._manifest = self._request("/v1/manifest")
        return self._manifest

    def check_encoder(self, sha256: str, name: str = "the encoder") -> None:
        """Refuse to send features the server's run would reject: `sha256` is not one of its encoders."""
        encoders = self.manifest().get("encoders", {})
        if not any(e.get("sha256") == sha256 for e in encoders.values()):
            raise ClientError(f"the server at {self.url} serves run {self.manifest().get('run')!r}, which did not "
                              f"export {name} (sha256 {sha256[:12]}): bundle the run the server serves")

    def infer(self, features, encoder_sha256: str, batch: int | None = None, accuracy: float | None = None,
              latency_ms: float | None = None) -> dict[str, Any]:
        """Post `features` (runtime.Features) in requests of at most `batch` samples (default: the
        server's max_batch); the answers concatenated. `accuracy` / `latency_ms`: a model zoo's
        targets (headers X-Qdefend-Accuracy, X-Qdefend-Latency-Ms; README: Model-zoo serving)."""
        limit = batch or (self.manifest().get("limits") or {}).get("max_batch", 256)
        targets = {}
        if accuracy is not None:
            targets["X-Qdefend-Accuracy"] = repr(float(accuracy))
        if latency_ms is not None:
            targets["X-Qdefend-Latency-Ms"] = repr(float(latency_ms))
        out: dict[str, list] = {"labels": [], "classes": [], "probabilities": []}
        for i in range(0, len(features.q), limit):
            body = wire.pack(features.q[i:i + limit], features.scale, features.zero_point, encoder_sha256,
                             bits=getattr(features, "bits", 8))
            res = self._request("/v1/infer", body, wire.BINARY_TYPE, targets)
            for k in out:
                out[k] += res[k]
        return out
