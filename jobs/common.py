"""What every `quantlake` command shares: the --storage-options flag and redacted error exits."""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import signal
import sys
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from workers.lake.records import VersionManifest
from workers.lake.redact import describe_error, redact_url

# Errors of the user's making (bad input, missing files): exit status 2, as argparse does.
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default=None,
                   help="fsspec options as JSON (endpoint, credentials, profile)")


def add_ray_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: host:port (its GCS), ray://host:port, or auto (the last `ray start` "
                        "here); default: RAY_ADDRESS, else a new local instance of this command's own")


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The flags a job that encodes shares (`ingest`, `reindex`)."""
    add_ray_address(p)
    p.add_argument("--encoder-actors", type=int, default=None,
                   help="encoder actors, each holding the model (default: one per GPU of the cluster, "
                        "else one of one CPU)")


def joined_negative(argv: list[str] | None, option: str) -> list[str]:
    """`argv` (None: the command line's) with `OPTION -5m` written `OPTION=-5m`: argparse takes
    a value that starts with `-` (and is not a plain number) for an option, and says only
    "expected one argument"; joined, the value reaches the check that says what is wrong with it."""
    out: list[str] = []
    for arg in sys.argv[1:] if argv is None else argv:
        if out and out[-1] == option and re.match(r"-\d", arg):
            out[-1] = f"{option}={arg}"
        else:
            out.append(arg)
    return out


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


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
    except BrokenPipeError:
        raise  # the reader of stdout went away (a job that prints as it goes): `console` exits quietly
    except USAGE_ERRORS as exc:
        status, text = 2, describe_error(exc, options, urls)
    except failures as exc:
        status, text = 1, describe_error(exc, options, urls)
    except Exception as exc:  # noqa: BLE001 - see above
        status, text = 1, f"{type(exc).__name__}: {describe_error(exc, options, urls)}"
    print(f"quantlake {command}: error: {text}", file=sys.stderr)
    return status, None


# Exit statuses of a command stopped from outside, as a shell reports a process a signal ended:
# Ctrl-C (SIGINT), and a reader of its output that went away (SIGPIPE).
INTERRUPTED = 128 + signal.SIGINT
READER_GONE = 128 + signal.SIGPIPE


def console(command: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """`main(argv)`'s exit status, for `quantlake <command>` and `python -m jobs.<module>`: a Ctrl-C
    is one line and status 130, a closed pipe on stdout (`quantlake history DEST | head -1`) a
    quiet exit, as Unix tools give, never a traceback. The job has cleaned up by then: an ingest
    interrupted commits nothing and stops its Ray on the way out (`jobs/ingest.run`)."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print(f"quantlake {command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # Python flushes stdout at exit, which would fail again and say so on stderr: what is
        # left unwritten goes to /dev/null instead (Python's docs, "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # no file descriptor: stdout is not a real stream
            pass
        return READER_GONE


def _storage(url: str) -> tuple[str, str] | None:
    """(protocol, bucket or host) of an object store URL, ("file", absolute path) of a local one;
    None for a chained URL (`a::b`), whose storage is not one place."""
    if "::" in url:
        return None
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("file", "local"):
        return "file", posixpath.normpath(LocalFileSystem._strip_protocol(url))
    return protocol, urlsplit(url).netloc.rsplit("@", 1)[-1]


def on_dataset_storage(dataset_url: str, source_url: str) -> bool:
    """Whether `source_url` lies on the dataset's own storage: same protocol and, for an object
    store, the same bucket (host for HTTP); for local paths, inside the folder that holds the
    dataset (`lake/raw` next to `lake/emb`)."""
    dataset, source = _storage(dataset_url), _storage(source_url)
    if dataset is None or source is None or dataset[0] != source[0]:
        return False
    if dataset[0] != "file":
        return bool(dataset[1]) and dataset[1] == source[1]
    parent = posixpath.dirname(dataset[1])
    if parent == "/":  # a dataset at the top of the disk: its folder would be the whole disk
        return False
    return source[1] == parent or source[1].startswith(parent + "/")


def storage_name(url: str) -> str:
    """Where `url` is stored, for messages: its bucket, or the folder that holds a local dataset."""
    where = _storage(url)
    if where is None:
        return redact_url(url)
    return f"the folder {posixpath.dirname(where[1])}" if where[0] == "file" else f"{where[0]}://{where[1]}"


def recorded_source(dataset_url: str, manifest: VersionManifest, without_lake: str) -> str:
    """The source URL `manifest` recorded, when this job may read it: only on the dataset's own
    storage (`on_dataset_storage`), since a manifest alone never chooses what the job's
    credentials read. Otherwise a ValueError says to pass --source; `without_lake` ends the
    message for a version written from vectors, which has no source lake.
    """
    url = manifest.source.url
    if url == "vectors:":
        raise ValueError(f"version {manifest.version} was written from vectors, without a source lake: "
                         f"{without_lake}")
    if not on_dataset_storage(dataset_url, url):
        raise ValueError(f"version {manifest.version} names its source {redact_url(url)}, which is "
                         f"not on the dataset's own storage ({storage_name(dataset_url)}); a manifest alone "
                         "never chooses what this job's credentials read: pass --source with the "
                         "source lake's URL")
    return url


def format_share(share: float) -> str:
    """A share of values (drift's clipped share, its threshold) as every output prints it: `6.4583%`."""
    return f"{share:.4%}"


def one_line(text: str) -> str:
    """`text` (an id, a file name) as a table or a list shows it: a line break or other control
    character in it is written as its escape (`\\n`), so each entry stays on its line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def format_fidelity(f: dict[str, Any], stored: Sequence[str] | None = None) -> str:
    """One line of a fidelity estimate (`workers/search/fidelity.py`) of ranges whose version
    stores `stored` precisions (None: not said)."""
    line = (f"fidelity on {f['queries']} held-out sample queries: recall of float32's top {f['k']} "
            f"{f['recall_int8']:.4f} int8, {f['recall_ubinary_int8']:.4f} ubinary + int8 rescoring (default search)")
    if stored is not None and "int8" not in stored:
        line += ("; this version stores no int8 vectors, so neither is a search of it: it is searched with "
                 "--rescore bits or none, which this does not measure")
    return line
