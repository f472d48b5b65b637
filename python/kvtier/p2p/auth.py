"""Cluster secret and the mutual HMAC challenge every connection passes before any data flows.

    client -> HELLO      node id, nonce_c, layout fingerprint, blob bytes, checksum algorithms
    server -> CHALLENGE  node id, nonce_s, its fingerprint, ..., mac_s = HMAC(secret, "server" | hello | challenge)
    client -> AUTH       mac_c = HMAC(secret, "client" | hello | challenge)
    server -> AUTH_OK    (or ERROR, then close)

Both sides prove the secret over a transcript holding both fresh nonces, so a recorded exchange
cannot be replayed and a server's answer cannot be reflected as a client's (different labels).
The secret never crosses the wire. Over TLS both MACs also cover the SHA-256 of the server's
certificate (as the client received it and as the server holds it: RFC 5929's tls-server-end-point
binding), so a relay terminating TLS with its own certificate fails the handshake even without a
CA. Over plain TCP frames after the handshake are neither MAC'd nor encrypted (docs/p2p.md,
"Trust model").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from kvtier.errors import InvalidArgumentError

MIN_SECRET_BYTES = 16
_SERVER_LABEL = b"kvtier-p2p-v1 server"
_CLIENT_LABEL = b"kvtier-p2p-v1 client"


def load_secret(secret: bytes | str | None = None, secret_file: str | os.PathLike | None = None) -> bytes:
    """The cluster secret from bytes/str or a file (trailing newline stripped); >= 16 bytes."""
    if (secret is None) == (secret_file is None):
        raise InvalidArgumentError("peers: give exactly one of secret and secret_file")
    if secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise InvalidArgumentError(f"peers.secret_file={str(secret_file)!r}: {e.strerror}") from None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, (bytes, bytearray)):
        raise InvalidArgumentError(f"peers.secret must be bytes or str, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidArgumentError(f"peers.secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return bytes(secret)


def new_nonce() -> bytes:
    return secrets.token_bytes(32)


def server_mac(secret: bytes, hello_body: bytes, challenge_unsigned: bytes, binding: bytes = b"") -> bytes:
    """``binding``: the TLS channel binding (32 bytes), empty over plain TCP."""
    return hmac.new(secret, _SERVER_LABEL + hello_body + challenge_unsigned + binding, hashlib.sha256).digest()


def client_mac(secret: bytes, hello_body: bytes, challenge_unsigned: bytes, binding: bytes = b"") -> bytes:
    return hmac.new(secret, _CLIENT_LABEL + hello_body + challenge_unsigned + binding, hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
