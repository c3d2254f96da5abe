"""TLS to the broker, carried in the one broker URL every part passes around: `amqps://host:5671/vhost?cafile=PATH`
(BrokerConfig.connection_url adds `cafile` from `[broker] ca_file`). The broker's certificate is verified against
that CA and its name against the URL's host. No kombu and no pika here: the hooks and the services both use it.
"""

from __future__ import annotations

import ssl
import urllib.parse


def split(url: str) -> tuple[str, str | None]:
    """(the URL without vtorque's own query keys, the CA file or None)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    cafile = query.pop("cafile", [None])[0]
    clean = parts._replace(query=urllib.parse.urlencode(query, doseq=True)).geturl()
    return clean, cafile


def uses_tls(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == "amqps"


def context(url: str) -> ssl.SSLContext | None:
    """The client context for an amqps URL: the site's CA (or the system's), peer and host name checked."""
    if not uses_tls(url):
        return None
    _, cafile = split(url)
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def kombu_ssl(url: str) -> dict | bool:
    """py-amqp's `ssl` option for an amqps URL (False for plain amqp)."""
    if not uses_tls(url):
        return False
    _, cafile = split(url)
    host = urllib.parse.urlsplit(url).hostname
    return {"ca_certs": cafile, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": host} if cafile else \
        {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": host}
