"""A job in its own process with its own local Ray, which a test can kill and check gone, by id.

Used for a driver to be killed, a Ray of another shape than the session's (a cluster, a head
with its dashboard), and a command whose console output is the thing tested. A job that fails
mid-run needs none of it: the pipeline is Ray Core tasks and actors (no Ray Data, whose failed
runs cancelled tasks with KeyboardInterrupt and could leave a worker with a half-imported module),
so such tests run it in the test session's process and Ray, and check it leaves no encoder actor.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _session_pids(sid: int, marker: str) -> list[int]:
    """Live processes of session `sid`, or with `marker` (the job's RAY_TMPDIR) in their environment."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if fields[0] != "Z" and (int(fields[3]) == sid or f"RAY_TMPDIR={marker}\0".encode() in env):
            found.append(int(name))
    return found


class Job:
    """`python ARGS` as the leader of a new session, its Ray under a private temp dir.

    Every process the job starts (its Ray's gcs_server, raylet, workers) stays in that
    session or carries that temp dir in its environment, so `stop()` finds them all.
    """

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str | None] | None = None):
        """`env`: variables to set for the job over this process's, None to unset one."""
        self.args, self.workdir = list(args), Path(workdir)
        self.env = dict(env or {})
        self.ray_tmp = tempfile.mkdtemp(prefix="qlr", dir="/tmp")  # short: Ray's socket paths have a limit
        self.runs = 0
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def start(self) -> subprocess.Popen:
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = self.ray_tmp
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        with open(self._log("out"), "w") as out, open(self._log("err"), "w") as err:
            self.proc = subprocess.Popen([sys.executable, *self.args], cwd=REPO, env=env, stdout=out,
                                         stderr=err, start_new_session=True)
        return self.proc

    def run(self, timeout_s: float = 420) -> tuple[int, str, str]:
        """Start, wait for the exit, check nothing is left; return `(exit status, stdout, stderr)`."""
        self.start()
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            self.stop()
        return (rc, *self.output())

    def output(self) -> tuple[str, str]:
        return self._log("out").read_text(), self._log("err").read_text()

    def _log(self, kind: str) -> Path:
        return self.workdir / f"job{self.runs}.{kind}"

    def stop(self) -> None:
        """SIGKILL the job's process group if it runs, then any process of its Ray still alive;
        raise if one survives."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 30
        while (left := _session_pids(p.pid, self.ray_tmp)) and time.monotonic() < deadline:
            for pid in left:  # raylet, gcs_server, workers: they outlive a driver killed by SIGKILL
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if _session_pids(p.pid, self.ray_tmp):
            raise AssertionError(f"processes of job {p.args} are still running after SIGKILL")
