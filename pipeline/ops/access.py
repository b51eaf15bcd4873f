"""Who may use the control API: the rules as plain functions, so each can be tested without a server.

- Every `/api/` route needs the bearer token when `http.auth_token` is set, reads included; `/metrics`,
  `/healthz` and `/readyz` stay open for Prometheus and probes.
- A request to `/api/` must name, in its `Host` header, a host this server answers for: an IP address, this
  machine's own names, or one of `http.allowed_hosts`. A web page that gets its own domain name resolved to
  127.0.0.1 (DNS rebinding) sends that domain as `Host`, so it is refused (400) before it can add a camera.
- Request bodies are capped (`http.max_body_bytes`); a body of unknown length is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    headers: tuple[tuple[str, str], ...] = ()


def own_host_names(bound_host: str) -> frozenset[str]:
    """The names this machine answers to; IP addresses are always accepted, so only names are listed."""
    names = {"localhost", socket.gethostname().lower()}  # not getfqdn: a reverse lookup can hang offline
    if bound_host not in ("", "0.0.0.0", "::"):
        names.add(bound_host.lower())
    return frozenset(names)


def host_name(header: str) -> str:
    """The host part of a `Host` header: no port, no brackets around IPv6, no trailing dot, lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(header: str | None, own_names: Iterable[str], allowed_hosts: Iterable[str]) -> bool:
    if not header:
        return False
    name = host_name(header)
    try:
        ipaddress.ip_address(name)
        return True  # rebinding needs a domain name; an address literal is what the client meant to reach
    except ValueError:
        pass
    if name in own_names:
        return True
    for pattern in allowed_hosts:
        pattern = pattern.lower().rstrip(".")
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def bearer_matches(authorization: str | None, token: str) -> bool:
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


def api_refusal(path: str, host: str | None, authorization: str | None, token: str | None,
                own_names: Iterable[str], allowed_hosts: Iterable[str]) -> Refusal | None:
    """Why a request may not reach the control API, or None when it may (or is not for the API)."""
    if not path.startswith("/api/"):
        return None
    if not host_allowed(host, own_names, allowed_hosts):
        return Refusal(400, f"this server does not answer for host '{host or ''}'; add it to http.allowed_hosts "
                            "if it is this server's name")
    if token is not None and not bearer_matches(authorization, token):
        return Refusal(401, "missing or wrong bearer token", (("WWW-Authenticate", "Bearer"),))
    return None


def body_refusal(content_length: str | None, chunked: bool, max_bytes: int) -> Refusal | None:
    if chunked:
        return Refusal(411, "send the body with a Content-Length")
    if content_length is None:
        return None
    try:
        length = int(content_length)
    except ValueError:
        return Refusal(400, "Content-Length is not a number")
    if length > max_bytes:
        return Refusal(413, f"the body is {length} bytes; this server takes at most {max_bytes} "
                            "(http.max_body_bytes)")
    return None
