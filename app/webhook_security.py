"""Webhook security: signing secrets (sealed at rest), Standard Webhooks signatures, and destination checks.

Secrets must be readable by the worker that signs, so they cannot be stored hashed like API tokens.
They are sealed with AES-GCM under a key derived (HKDF-SHA256) from ``KILN_SECRET_KEY``, the user's
id as associated data: a database dump alone does not reveal them, and a sealed secret copied to
another user's row does not open. Changing ``KILN_SECRET_KEY`` makes them unreadable: deliveries
then fail with a message saying to rotate the secret.

Destinations: a URL whose host is, or resolves only to, a loopback, private, link-local or other
non-global address is refused at submit, and again at delivery time, where the request goes to the
very address that was checked (Host header and TLS SNI carry the name), so a DNS answer that changes
between check and connect (rebinding) cannot redirect it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from app.settings import Settings

SECRET_PREFIX = "whsec_"
_SEAL_VERSION = "v1:"
Resolver = Callable[[str, int], list[str]]


class DestinationRefused(ValueError):
    """A webhook URL that may not be called; ``retryable`` when the cause may pass (a DNS failure)."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# --- secrets ----------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 32 random bytes in base64 (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(settings: Settings) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"kiln webhook secrets v1").derive(settings.secret_key.encode())


def seal_secret(settings: Settings, *, user_id: int, secret: str) -> str:
    """Encrypt ``secret`` for storage in ``users.webhook_secret``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    sealed = AESGCM(_key(settings)).encrypt(nonce, secret.encode(), str(user_id).encode())
    return _SEAL_VERSION + base64.b64encode(nonce + sealed).decode()


def open_secret(settings: Settings, *, user_id: int, sealed: str | None) -> str:
    """Decrypt a stored secret; ValueError (with what to do) when there is none or it does not open."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not sealed:
        raise ValueError("the job's owner has no webhook secret: create one with POST /api/v1/webhook-secret")
    try:
        raw = base64.b64decode(sealed.removeprefix(_SEAL_VERSION))
        return AESGCM(_key(settings)).decrypt(raw[:12], raw[12:], str(user_id).encode()).decode()
    except (InvalidTag, ValueError) as exc:
        raise ValueError("the webhook secret cannot be decrypted (was KILN_SECRET_KEY changed?): "
                         "rotate it with POST /api/v1/webhook-secret") from exc


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Whether a request's ``webhook-signature`` header holds a valid signature of its body (receivers' side)."""
    expected = sign(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body).split(",", 1)[1]
    return any(hmac.compare_digest(expected, part.split(",", 1)[1])
               for part in headers["webhook-signature"].split() if part.startswith("v1,"))


# --- destinations -----------------------------------------------------------------------------


def refusal(address: str) -> str | None:
    """Why ``address`` may not receive webhooks (not a global unicast address), or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return f"{address} is a loopback address"
    if ip.is_link_local:
        return f"{address} is a link-local address"
    if ip.is_private:
        return f"{address} is a private address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return f"{address} is not a public unicast address"
    return None


def _port(parts) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (getaddrinfo)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def check_destination(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> None:
    """At submit: refuse a host that is, or resolves only to, non-global addresses (a name that does
    not resolve now is accepted; delivery checks it again)."""
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = _literal(host)
    if literal is not None:
        if (why := refusal(literal)) is not None:
            raise DestinationRefused(f"{why}; webhooks go to public addresses only")
        return
    try:
        addresses = (resolver or system_resolver)(host, _port(parts))
    except (OSError, UnicodeError):
        return
    reasons = [refusal(a) for a in addresses]
    if addresses and all(reasons):
        raise DestinationRefused(f"{host} resolves only to non-public addresses ({reasons[0]}); "
                                 "webhooks go to public addresses only")


def resolve_checked(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> str:
    """At delivery: resolve the host once and return a permitted address to connect to."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = (resolver or system_resolver)(host, _port(parts))
        except (OSError, UnicodeError) as exc:
            raise DestinationRefused(f"cannot resolve {host}: {exc}", retryable=True) from None
        if not addresses:
            raise DestinationRefused(f"{host} resolves to no address", retryable=True)
    if allow_private:
        return addresses[0]
    for address in addresses:
        if refusal(address) is None:
            return address
    raise DestinationRefused(f"refused: {host} resolves to {refusal(addresses[0])}; "
                             "webhooks go to public addresses only")


def pinned_request(url: str, address: str, *, headers: dict[str, str], body: bytes, timeout: float,
                   max_body: int) -> tuple[int, str]:
    """POST ``body`` to ``url`` over a connection to ``address``; returns the status and a body prefix.

    No redirects, no proxies from the environment (a proxy would resolve the name itself), the
    certificate checked against the URL's host name.
    """
    import httpx

    parts = urlsplit(url)
    ip = ipaddress.ip_address(address)
    netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    if parts.port:
        netloc += f":{parts.port}"
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.hostname if not parts.port else f"{parts.hostname}:{parts.port}"
    if ":" in (parts.hostname or "") and not parts.hostname.startswith("["):
        host_header = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        request = client.build_request("POST", target, content=body, headers={**headers, "host": host_header},
                                       extensions=extensions)
        response = client.send(request, stream=True)
        try:
            prefix = b""
            for chunk in response.iter_raw():
                prefix += chunk
                if len(prefix) >= max_body:
                    break
        finally:
            response.close()
    return response.status_code, prefix[:max_body].decode("utf-8", errors="replace")
