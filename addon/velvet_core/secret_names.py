"""Which query parameters and header names carry a secret, and a request path with those values taken out.

Azure- and Google-style clients send keys in the URL (``?api-key=``, ``?key=``), gateways in headers of their
own (``x-goog-api-key``, ``ocp-apim-subscription-key``, ``cf-aig-authorization``, ``helicone-auth``). A name is
secret when it is one of :data:`NAMES` or ends like one (``*_key``, ``*token``, ``*secret``, ``*password``,
``*signature``, ``*auth``, ``*credential``, ``*cookie``): a new gateway's header is caught by the rule, not by a
list that must know it. Case, ``-`` and ``_`` do not matter. Keeping a harmless value out (a page token) costs
nothing; keeping a key costs the key.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

REDACTED = "***"
# exact names (normalised: lower case, "-" as "_"): keys (key: Google; api_key: Azure), signed URLs (sig: Azure
# SAS; signature), OAuth (code: also Azure Functions' key, client_secret, access_token), passwords and sessions
NAMES = frozenset({"key", "apikey", "api_key", "token", "access_token", "refresh_token", "id_token", "sig",
                   "signature", "code", "client_secret", "secret", "password", "passwd", "pwd", "pass", "auth",
                   "authorization", "jwt", "session", "sessionid", "session_id", "subscription_key",
                   "x_goog_api_key", "x_amz_security_token", "x_amz_signature", "x_amz_credential",
                   "x_goog_signature", "x_goog_credential", "proxy_authorization", "proxy_authenticate",
                   "www_authenticate", "cookie", "set_cookie"})
ENDINGS = ("_key", "apikey", "token", "secret", "password", "passwd", "signature", "auth", "authorization",
           "credential", "credentials", "cookie")
NOT_SECRET = frozenset({"idempotency_key"})  # a retry's request id, worth keeping
# the query parameters whose value is a key of the account (its fingerprint is kept, as for a header's key)
KEY_NAMES = frozenset({"key", "apikey", "api_key", "subscription_key", "x_goog_api_key", "access_token", "token"})


def _norm(name: str) -> str:
    if "%" in name or "+" in name:  # (as a server reads it: api%2Dkey is api-key)
        name = unquote_plus(name)
    return name.strip().lower().replace("-", "_")


def _secret(n: str) -> bool:
    return n not in NOT_SECRET and (n in NAMES or n.endswith(ENDINGS))


def secret_name(name: str) -> bool:
    """Whether a query parameter or header called ``name`` (percent-encoded or not) carries a secret."""
    return _secret(_norm(name))


# Raw header names seen and found not secret: the event loop's hooks test ``name in PLAIN`` first (a set lookup,
# no call: most names of most flows), and call :func:`secret_header` only for the others (which adds them here).
PLAIN: set[bytes] = set()
_SECRET: set[bytes] = set()
_TAG = b"velvet-metadata-"  # (never plain: the capture takes them out of the request)
_CACHE = b"velvet-cache"  # (nor the cache's headers: the same)


def secret_header(name: bytes) -> bool:
    """:func:`secret_name` for a raw header name (remembered: see :data:`PLAIN`)."""
    if name in _SECRET:
        return True
    if name in PLAIN:
        return False
    secret = secret_name(name.decode("latin-1"))
    if len(PLAIN) + len(_SECRET) < 4096:  # (names a client makes up cannot grow them without end)
        if secret:
            _SECRET.add(name)
        elif not name.lower().startswith((_TAG, _CACHE)):
            PLAIN.add(name)
    return secret


def redact_path(path: str) -> tuple[str, str | None]:
    """``path`` with the values of secret query parameters replaced by ``***``, and the first key found
    (for its fingerprint); a path without a query is returned as it is, at once."""
    head, sep, query = path.partition("?")
    if not sep:
        return path, None
    key: str | None = None
    parts = query.split("&")
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        n = _norm(name)
        if eq and _secret(n):
            parts[i] = f"{name}={REDACTED}"
            if key is None and n in KEY_NAMES and value:
                key = unquote_plus(value)
    return f"{head}?{'&'.join(parts)}", key
