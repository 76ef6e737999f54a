"""Redaction of secrets in storage options, URLs and messages before anything shows them."""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

MASK = "***"
# An option or variable whose name contains one of these words holds a secret.
SECRET_NAME = re.compile(r"key|secret|token|passw|credential", re.IGNORECASE)
# `scheme://user:password@host`: the user part can be an access key, so all of it goes.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s\"']+)@")
# Shorter values ("1", "us") would mask unrelated text without hiding anything.
_MIN_SECRET_LEN = 6


def redact_url(url: str) -> str:
    """`url` with any `user:password@` part replaced by `***@`."""
    return _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", url)


def redact(options: Any) -> Any:
    """A copy of `options` (nested dicts and lists) with secret values masked.

    A value is masked when its key matches key/secret/token/password/credential (any case);
    strings elsewhere lose their URL credentials.
    """
    if isinstance(options, Mapping):
        return {k: MASK if SECRET_NAME.search(str(k)) and v not in (None, "") else redact(v)
                for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str):
        return redact_url(options)
    return options


def secret_values(options: Any = None, environ: Mapping[str, str] | None = None,
                  urls: Iterable[str | None] = ()) -> set[str]:
    """The secret strings in `options`, the environment and `urls`, to scrub from free text.

    A library's error message may quote a key it was given (an XML error body) or a URL's
    credentials without the URL around them (an invalid bucket name `key:pass@bucket`);
    masking by key name or URL shape cannot reach those, masking by value can.
    """
    found: set[str] = set()

    def userinfo(text: str) -> None:
        for m in _USERINFO.finditer(text):
            found.add(m["userinfo"])
            found.update(m["userinfo"].split(":", 1))

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, secret or bool(SECRET_NAME.search(str(k))))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, secret)
        elif isinstance(obj, str):
            if secret:
                found.add(obj)
            userinfo(obj)

    walk(options, False)
    env = os.environ if environ is None else environ
    walk({k: v for k, v in env.items() if SECRET_NAME.search(k)}, True)
    for url in urls:
        if url:
            userinfo(url)
    return {s for s in found if len(s) >= _MIN_SECRET_LEN}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without URL credentials and without any of the literal `secrets`."""
    text = redact_url(str(text))
    for s in sorted(set(secrets), key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(s, MASK)
    return text


def describe_error(exc: BaseException, options: Any = None, urls: Iterable[str | None] = ()) -> str:
    """`str(exc)` made safe to print or log: the secrets of `options`, the environment and the
    credentials in `urls` (the job's source, destination...) masked."""
    return redact_text(str(exc) or type(exc).__name__, secret_values(options, urls=urls))
