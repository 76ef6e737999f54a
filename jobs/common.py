"""What every `quantlake` command shares: the --storage-options flag and redacted error exits."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Iterable

from workers.lake.redact import describe_error

# Errors of the user's making (bad input, missing files): exit status 2, as argparse does.
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default=None,
                   help="fsspec options as JSON (endpoint, credentials, profile)")


def storage_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """The parsed --storage-options, or a parser error naming what is wrong with the JSON."""
    try:
        options = json.loads(a.storage_options) if a.storage_options else {}
    except json.JSONDecodeError as exc:
        p.error(f"--storage-options is not valid JSON: {exc}")
    if not isinstance(options, dict):
        p.error(f"--storage-options must be a JSON object, got {type(options).__name__}")
    return options


def run_reporting(command: str, fn: Callable[[], Any], options: Any, urls: Iterable[str | None],
                  failures: tuple[type[BaseException], ...] = ()) -> tuple[int, Any]:
    """Call `fn`; on an error print one redacted line and return its exit status.

    Returns `(0, result)` on success. Usage errors exit 2, `failures` (the job ran and
    failed) and anything unexpected exit 1. No traceback: it would print the message
    unredacted, and a library's error may quote an endpoint URL or a key it was given.
    """
    urls = list(urls)
    try:
        return 0, fn()
    except USAGE_ERRORS as exc:
        status, text = 2, describe_error(exc, options, urls)
    except failures as exc:
        status, text = 1, describe_error(exc, options, urls)
    except Exception as exc:  # noqa: BLE001 - see above
        status, text = 1, f"{type(exc).__name__}: {describe_error(exc, options, urls)}"
    print(f"quantlake {command}: error: {text}", file=sys.stderr)
    return status, None
