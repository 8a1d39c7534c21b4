"""One redaction for every message that may carry a secret: URL passwords, API keys, bearer tokens, secret
query parameters (:func:`velvet_core.secret_names.secret_name`)."""

from __future__ import annotations

import re
from typing import overload

from velvet_core.secret_names import REDACTED, secret_name

_PATTERNS = (
    # URL password. The scheme starts a word and is at most 32 characters: an unbounded one made a long run of
    # letters quadratic (200 kB of text took 119 s, found by velvet ask's fuzzing)
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]{0,31}://[^:/@\s]*):[^@\s/]*@", re.I), r"\g<scheme>:***@"),
    (re.compile(r"\b(password|passwd|pwd)\s*=\s*('[^']*'|\"[^\"]*\"|\S+)", re.I), r"\1=***"),  # libpq key=value
    (re.compile(r"\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.I), r"\1 ***"),
    (re.compile(r"\b(sk|sess|rk)-[A-Za-z0-9_-]{8,}"), r"\1-***"),  # OpenAI-style keys
)


_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#?;\s]+)=(?P<value>[^&#;\s]*)")


def _param(m: re.Match[str]) -> str:
    return f"{m['sep']}{m['name']}={REDACTED}" if secret_name(m["name"]) else m[0]


@overload
def redact(text: str) -> str: ...
@overload
def redact(text: None) -> None: ...


def redact(text: str | None) -> str | None:
    """``text`` with passwords, keys and tokens (query parameters named like secrets too) replaced by ``***``
    (``None`` stays ``None``: an error that is not there)."""
    if text is None:
        return None
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return _QUERY.sub(_param, text) if "=" in text else text
