"""Redaction of secrets in storage options, URLs and messages before anything shows them."""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import unquote

MASK = "***"
# An option, variable, header or query parameter whose name matches holds a secret: keys
# (`account_key`, `X-Api-Key`, `AWSAccessKeyId`), secrets, tokens (`sas_token`,
# `X-Amz-Security-Token`), passwords, credentials (`X-Amz-Credential`), signatures
# (`X-Amz-Signature`, `X-Goog-Signature`, Azure SAS `sig`), `Authorization` and `Cookie`
# headers, connection strings (they embed the account key).
SECRET_NAME = re.compile(r"key|secret|token|passw|credential|signature|authori[sz]ation|cookie"
                         r"|connection_?string|conn_?str|^sig$|^auth$", re.IGNORECASE)
# `scheme://user:password@host`: the user part can be an access key, so all of it goes.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s\"']+)@")
# One `name=value` of a query string (or of a `;`-separated connection string): a signed URL
# carries its signature, credential and session token there.
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.%\-]+)=(?P<value>[^&;#\s\"'<>]*)")
# An `Authorization` header quoted in a message (a request dump): its whole value goes (an
# AWS4 one holds the key id and signature); a bare bearer token too.
_AUTH_VALUE = re.compile(r"(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+"
                         r"|(?P<bearer>\bBearer\s+)[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE)
# Shorter values ("1", "us") would mask unrelated text without hiding anything.
_MIN_SECRET_LEN = 6


def _secret_param(m: re.Match) -> bool:
    return bool(m["value"]) and bool(SECRET_NAME.search(unquote(m["name"])))


def redact_url(url: str) -> str:
    """`url` (or any text holding URLs) with any `user:password@` part replaced by `***@` and
    the values of secret query parameters (`X-Amz-Signature=`, `sig=`, `token=`...) by `***`."""
    url = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", url)
    return _PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if _secret_param(m) else m[0], url)


def url_secrets(text: str) -> Iterator[str]:
    """The credentials `redact_url` would mask in `text`: userinfo (whole, and user and
    password apart) and secret query values (as written, and percent-decoded)."""
    for m in _USERINFO.finditer(text):
        yield m["userinfo"]
        yield from m["userinfo"].split(":", 1)
    for m in _PARAM.finditer(text):
        if _secret_param(m):
            yield m["value"]
            yield unquote(m["value"])


def redact(options: Any) -> Any:
    """A copy of `options` (nested dicts and lists) with secret values masked.

    A value is masked when its key matches `SECRET_NAME` (any case), so header maps such as
    `{"headers": {"Authorization": ...}}` are covered; strings elsewhere lose their URL
    credentials and signed-URL query values.
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
        found.update(url_secrets(text))

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
    """`text` without URL credentials, `Authorization` values and any of the literal `secrets`."""
    text = _AUTH_VALUE.sub(lambda m: (m["head"] or m["bearer"]) + MASK, redact_url(str(text)))
    for s in sorted(set(secrets), key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(s, MASK)
    return text


def describe_error(exc: BaseException, options: Any = None, urls: Iterable[str | None] = ()) -> str:
    """`str(exc)` made safe to print or log: the secrets of `options`, the environment and the
    credentials in `urls` (the job's source, destination...) masked."""
    return redact_text(str(exc) or type(exc).__name__, secret_values(options, urls=urls))
