"""What other machines call this one by, and the Host headers MLflow's server must then accept: for
``cnn-train up --host 0.0.0.0``, where teammates' browsers and clients reach the servers from elsewhere."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse

from cnn_train.flows.ops.auth import LOOPBACK

#: MLflow's own setting for the host names its server answers to, beyond loopback and private addresses.
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"
#: MLflow's own setting for the pages (origins) whose scripts may change things through its API, beyond localhost.
ALLOWED_ORIGINS_ENV = "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"


def machine_addresses() -> list[str]:
    """What other machines may call this one by, best first: a fully qualified name, each interface's
    IPv4 then IPv6 address, the bare host name (which other machines resolve least often). Loopback and
    link-local addresses are left out: they mean another machine there."""
    import psutil

    fqdn, hostname = socket.getfqdn(), socket.gethostname()
    found = [a for addrs in psutil.net_if_addrs().values() for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
    interfaces = [a.address.split("%")[0] for a in sorted(found, key=lambda a: a.family != socket.AF_INET)]
    named = [fqdn] if "." in fqdn else []
    return list(dict.fromkeys(value for value in [*named, *interfaces, hostname, fqdn] if _elsewhere_too(value)))


def _elsewhere_too(value: str) -> bool:
    """Whether ``value`` names this machine from another one too (``localhost`` and ``fe80::1`` do not)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:  # a name
        return bool(value) and value.split(".")[0] != "localhost"
    return not (address.is_loopback or address.is_link_local)


def url_host(address: str) -> str:
    """``address`` as a URL's host: an IPv6 address goes in brackets."""
    return f"[{address}]" if ":" in address else address


def allowed_host_patterns(names: list[str]) -> list[str]:
    """MLflow's default Host-header patterns (loopback and private addresses), then each of ``names`` as it
    is (a value without ``*`` is compared as a string) and with any port (an fnmatch pattern, where ``[``
    opens a character class: an IPv6 bracket is written ``[[]``)."""
    # No public API gives MLflow's default list; this module function is what its server itself reads.
    from mlflow.server.security_utils import get_default_allowed_hosts

    mine = [pattern for name in names for pattern in ([f"[{name}]", f"[[]{name}]:*"] if ":" in name else [name, f"{name}:*"])]
    return list(dict.fromkeys([*get_default_allowed_hosts(), *mine]))


def allowed_origins(names: list[str], port: int) -> list[str]:
    """The origins of MLflow's own UI as a browser elsewhere opens it, by each of ``names``: without them,
    MLflow's guard refuses the UI's own POSTs ("Cross-origin request blocked") and its pages stay empty."""
    return [f"{scheme}://{url_host(name)}:{port}" for name in names for scheme in ("http", "https")]


def start_hint(url: str, start: str) -> str:
    """What to do about a server at ``url`` that does not answer: ``start`` it, when it is on this machine;
    on another one, only the person there can (`cnn-train up` here would start a second, empty server)."""
    host = urlparse(url).hostname or ""
    if host in LOOPBACK or host in machine_addresses():
        return start
    return f"check that it runs on {host} and that this machine reaches it"


def same_server(url: str, other: str) -> bool:
    """Whether two URLs reach the same server on this machine: ``localhost``, ``127.0.0.1`` and ``::1``
    are one host, and a trailing slash changes nothing; anything else compares as written."""

    def key(value: str) -> tuple[str, str | None, int | None, str] | str:
        parsed = urlparse(value.rstrip("/"))
        if parsed.scheme not in ("http", "https"):
            return value.rstrip("/")
        host = "127.0.0.1" if parsed.hostname in LOOPBACK else parsed.hostname
        return parsed.scheme, host, parsed.port or (443 if parsed.scheme == "https" else 80), parsed.path

    return key(url) == key(other)


def api_url_problem(variable: str, url: str) -> str | None:
    """What is wrong with ``url`` as an http(s) address, for the one line that refuses ``variable``; None when nothing is."""
    try:
        parsed = urlparse(url)
        host, _ = parsed.hostname, parsed.port
    except ValueError as error:  # a port past 65535, a bracket left open
        return f"{variable} {url!r} is not a valid address: {error}"
    if parsed.scheme not in ("http", "https"):
        guess = f" (did you mean http://{url}?)" if "://" not in url else ""
        return f"{variable} {url!r} is no http:// or https:// address{guess}"
    if not host or any(character.isspace() for character in url):
        return f"{variable} {url!r} is not a valid address: give http://HOST:PORT/api, without spaces"
    return None
