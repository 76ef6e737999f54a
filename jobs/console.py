"""What a command shows on stderr: all it and the libraries write there, less Ray's known false alarms.

Ray Core's C++ code writes its ERROR lines straight to file descriptor 2 (they are in the
driver's Ray log file too), so no Python logging setting reaches them. `filtered_stderr`
sends descriptor 2 through a small filter process that drops the lines in `FALSE_ALARMS`,
each matched whole, and passes every other byte on unchanged and at once (progress bars
included). A separate process, not a thread: when the command dies abruptly (a C++ fatal
error, a signal), the filter still reads to the end and shows what was written last.
"""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import termios
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Lines Ray prints on a clean run that report no fault of the run, and that no Ray option
# turns off.
FALSE_ALARMS: tuple[re.Pattern[bytes], ...] = (
    # Ray Core, once per driver process, for any actor with restarts whose constructor takes
    # an object-store argument. Ray Data's actor pools always pass their function and context
    # that way, and hold both for the pool's life, so the restart it warns about works
    # (tests/test_faults.py kills an encoder actor). Only Ray Data's MapWorker actors: the same
    # line for an actor of ours would be a real warning. ray-project/ray#57733.
    re.compile(rb"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: "
               rb"'MapWorker\([^'\n]*\)' and ID: '[0-9a-f]+' has constructor arguments in the object "
               rb"store and max_restarts > 0\.[^\n]*\n"),
)
# The start of a Ray C++ log line ("[2026-11-23 05:01:48,710 E ...") that has not ended yet,
# or what may be its first bytes: held back until it ends, so that a line cut between two
# reads is still matched whole (up to HOLD_BYTES, then let through).
_UNFINISHED = re.compile(rb"\[(?:\d{4}-\d\d-\d\d [^\n]*|[\d -]{0,10})\Z")
HOLD_BYTES = 1 << 16
READ_BYTES = 1 << 16
# How long a command's exit waits for the filter to show the last output. A process the
# command started may still hold the pipe: the filter then ends with it, unwaited.
DRAIN_TIMEOUT_S = 10.0
_ROOT = str(Path(__file__).resolve().parents[1])
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from jobs.console import pump; pump()"


def drop_false_alarms(data: bytes) -> bytes:
    """`data` less every `FALSE_ALARMS` line in it; all other bytes unchanged, in order."""
    for alarm in FALSE_ALARMS:
        data = alarm.sub(b"", data)
    return data


class AlarmFilter:
    """`drop_false_alarms` over a stream, however it is cut into pieces."""

    def __init__(self):
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What can be shown of the stream so far."""
        data = self._held + data
        start = _UNFINISHED.search(data)
        cut = start.start() if start and len(data) - start.start() <= HOLD_BYTES else len(data)
        self._held = data[cut:]
        return drop_false_alarms(data[:cut])

    def close(self) -> bytes:
        """The rest, at the end of the stream."""
        data, self._held = self._held, b""
        return drop_false_alarms(data)


def pump(src: int = 0, dst: int = 1) -> None:
    """Copy `src` to `dst` until end of file, less `FALSE_ALARMS` (the filter process's loop)."""
    stream, out = AlarmFilter(), b""
    while True:
        try:
            data = os.read(src, READ_BYTES)
        except OSError:  # a terminal's reading end says EIO once its last writer is gone
            data = b""
        out = stream.feed(data) if data else stream.close()
        try:
            while out:
                out = out[os.write(dst, out):]
        except OSError:
            pass  # the console is gone: keep reading, so that writers never block on a full pipe
        if not data:
            return


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Within the block, this process's stderr (descriptor 2: Python's writes and native
    libraries') goes through `pump` in a filter process; on exit, once the filter has shown
    what the block wrote, stderr is restored."""
    if sys.stderr is not None:
        sys.stderr.flush()
    child = None
    try:
        console = os.dup(2)
    except OSError:  # no stderr to filter
        console = None
    if console is not None:
        read, write = _channel(console)
        try:
            # Its own session: a Ctrl-C meant for the command must not stop the filter first,
            # or what the command prints on its way out would be lost.
            child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD, _ROOT], stdin=read,
                                     stdout=console, stderr=console, start_new_session=True)
        except OSError:  # no filter: the block writes to stderr as it is
            os.close(write)
            os.close(console)
        finally:
            os.close(read)
    if child is None:
        yield
        return
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(console, 2)  # closes this process's writing end: the filter reads to the end
        os.close(console)
        try:
            child.wait(DRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass


def _channel(console: int) -> tuple[int, int]:
    """(reading, writing) ends from the command to its filter: a pipe, or for a terminal a
    terminal of the same size, so that what sizes itself to one (the progress bar) still can."""
    if not os.isatty(console):
        return os.pipe()
    read, write = os.openpty()
    fcntl.ioctl(write, termios.TIOCSWINSZ, fcntl.ioctl(console, termios.TIOCGWINSZ, bytes(8)))
    attrs = termios.tcgetattr(write)
    attrs[1] &= ~termios.OPOST  # the bytes as written: no "\n" -> "\r\n" (the real terminal does that)
    termios.tcsetattr(write, termios.TCSANOW, attrs)
    return read, write
