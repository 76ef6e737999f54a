"""What a user sees: a clean `quantlake ingest` prints its bar and summary and nothing that looks
like an error; a failing one still prints its error, and Ray's own report of a real failure.

The commands run as they are run by hand: `python -m jobs.<name>` in its own process, with its
own local Ray (tests/isolated.py), on a small real lake.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_parquet_lake
from isolated import REPO, Job

# The two lines a clean ingest printed on stderr when it ran on Ray Data's actor pools, as Ray wrote
# them: what the noise patterns below must catch.
RAY_CORE_ALARM = (b"[2026-11-23 05:01:48,710 E 30083 30083] core_worker.cc:2465: Actor with class name: "
                  b"'MapWorker(Map(Encoder))' and ID: '123488172101db9316f6850a01000000' has constructor "
                  b"arguments in the object store and max_restarts > 0. If the arguments in the object store "
                  b"go out of scope or are lost, the actor restart will fail. See "
                  b"https://github.com/ray-project/ray/issues/53727 for more details.\n")
RAY_DATA_BARS_OFF = ("2026-11-23 05:01:48,711\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
                     "`ray.data.DataContext.get_current().enable_progress_bars = True`.\n")
# What must not be on a clean run's stderr: Ray's C++ log lines (glog style, E/W/F), lines
# forwarded from Ray's processes, Ray Data's bar warning, and anything called an error or warning.
NOISE = [re.compile(p, re.I | re.M) for p in (
    r"^\[?\d{4}-\d\d-\d\d [\d:,.]+ [EWF] \d+ \d+\]", r"core_worker\.cc|raylet|gcs_server", r"\bpid=\d+",
    r"progress bars? (are |is )?disabled", r"error|warning|traceback|exception")]
BAR = re.compile(r"ingest: +\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]")
ARGS = ["--id-column", "id", "--calibration-samples", "50", "--unit-rows", "25", "--batch-size", "16"]


def noise(err: str) -> list[str]:
    """The lines of `err` (bar updates split on carriage returns) that match a NOISE pattern."""
    return [line for line in re.split(r"[\r\n]", err) if any(p.search(line) for p in NOISE)]


def test_the_noise_patterns_catch_what_ray_printed():
    # The clean-run assertions below would pass vacuously with patterns that miss these.
    assert noise(RAY_CORE_ALARM.decode() + RAY_DATA_BARS_OFF) == [RAY_CORE_ALARM.decode()[:-1],
                                                                  RAY_DATA_BARS_OFF[:-1]]
    assert noise("(MapWorker(Map(_UnitEncoder)) pid=3495) loading\n") == ["(MapWorker(Map(_UnitEncoder)) pid=3495) loading"]
    assert noise("\ringest:  50%|█████     | 25/50 [00:05<00:05,  4.43doc/s]\n") == []


@pytest.fixture(scope="module")
def lake(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("console")
    write_parquet_lake(root / "lake", docs[:50], files=2, row_group_size=25)
    return root


@pytest.fixture(scope="module")
def as_by_hand(lake):
    """The environment of a command run by hand: Ray's default authentication (the session's
    RAY_AUTH_MODE=disabled unset), with a home of its own for the token Ray then makes."""
    home = lake / "home"
    home.mkdir(exist_ok=True)
    return {"RAY_AUTH_MODE": None, "HOME": str(home)}


@pytest.fixture(scope="module")
def clean_run(lake, as_by_hand):
    """`quantlake ingest` of 50 documents with its progress bar: (exit status, stdout, stderr)."""
    with Job(["-m", "jobs.ingest", str(lake / "lake"), str(lake / "dest"), *ARGS], lake, env=as_by_hand) as job:
        return job.run()


def test_a_clean_ingest_prints_its_bar_and_summary_and_nothing_else(clean_run):
    rc, out, err = clean_run
    assert rc == 0, err
    assert out.startswith("committed version 1: 50 documents, 0 rejects (of 50 rows read), 2 shards"), out
    assert BAR.search(err) and "| 50/50 [" in err, err  # the bar is on stderr, up to every row
    assert noise(err) == [], err
    assert [s for s in re.split(r"[\r\n]", err) if s.strip() and not BAR.fullmatch(s.strip())] == [], err


def test_the_clean_run_kept_rays_token_authentication(clean_run, as_by_hand):
    # Its local instance ran with the token Ray made (only its notice was kept off the console).
    assert clean_run[0] == 0
    token = os.path.join(as_by_hand["HOME"], ".ray", "auth_token")
    assert re.fullmatch(r"[0-9a-f]{32,}", open(token).read().strip())


def test_search_with_ray_prints_hits_and_nothing_on_stderr(clean_run, lake, tmp_path, as_by_hand):
    assert clean_run[0] == 0
    with Job(["-m", "jobs.search", str(lake / "dest"), "read a JSON document", "-k", "3", "--ray"],
             tmp_path, env=as_by_hand) as job:
        rc, out, err = job.run()
    assert (rc, err) == (0, ""), err
    assert out.startswith("query: read a JSON document\n") and len(re.findall(r"(?m)^ +\d\. ", out)) == 3, out


def test_bad_text_column_prints_its_error_alone(lake, tmp_path):
    with Job(["-m", "jobs.ingest", str(lake / "lake"), str(tmp_path / "dest"), "--text-column", "body"],
             tmp_path) as job:
        rc, out, err = job.run()
    assert (rc, out) == (2, "")
    assert err == ("quantlake ingest: error: file part-00000.parquet has no text column 'body' "
                   "(columns: id, text); pass --text-column\n")


# The command, with one fault injected in the driver (tests/lakes.py): a source file breaks after
# it was checked, scanned and planned, so reading its units fails on every attempt.
CORRUPT_AFTER_PLANNING = """
import sys
sys.path.insert(0, "tests")
import jobs.ingest as ingest
from lakes import corrupting_plan
ingest.plan_units = corrupting_plan(ingest.plan_units)
sys.exit(ingest.main(sys.argv[1:]))
"""


def test_a_unit_failing_inside_ray_prints_one_error_naming_it(docs, tmp_path):
    write_parquet_lake(tmp_path / "lake", docs[:50], files=2, row_group_size=25)
    with Job(["-c", CORRUPT_AFTER_PLANNING, str(tmp_path / "lake"), str(tmp_path / "dest"), *ARGS], tmp_path) as job:
        rc, out, err = job.run()
    assert (rc, out) == (1, "")
    # The progress bar, then our line: the unit, the step and the cause; no Ray warning about
    # retries of the calls queued at the encoder actor, which the failed pass cancelled.
    lines = [s for s in re.split(r"[\r\n]", err) if s.strip() and not BAR.fullmatch(s.strip())]
    assert len(lines) == 1 and re.fullmatch(
        r"quantlake ingest: error: work unit part-00001\.parquet rows \[0, 25\) \(shard [0-9a-f]{32}\): "
        r"read failed: SourceChanged: source file part-00001\.parquet changed while the job ran \(.*\); "
        r"run the job again to read it as it is; nothing was committed", lines[0]), err


def test_encoder_actors_that_leave_no_cpu_for_the_tasks_are_an_error_not_a_wait(lake, tmp_path):
    """On its own local instance, encoder actors (one CPU each) that take every CPU would leave
    the scan, read and write tasks waiting for ever: the job says so before it starts them."""
    n = os.cpu_count()
    with Job(["-m", "jobs.ingest", str(lake / "lake"), str(tmp_path / "dest"), *ARGS, "--encoder-actors", str(n)],
             tmp_path) as job:
        rc, out, err = job.run()
    assert (rc, out) == (2, ""), err
    assert re.fullmatch(rf"quantlake ingest: error: {n} encoder actor\(s\) of 1 CPU each leave 0 of the cluster's "
                        r"(\d+) CPUs for the scan, read and write tasks, which need 1: the job would wait for ever "
                        r"\(at most (\d+) encoder actor\(s\) fit, --encoder-actors\)\n", err), err
    assert not (tmp_path / "dest" / "versions").exists()


# What a Ray worker process wrote to stderr in a failing ingest here (abseil's mutex debug trace),
# which Ray forwarded to the driver, then a line of the task's own.
ABSEIL_TRACE = ["[mutex.cc : 452] RAW: Lock blocking 0x55a73eff0b70   @ 0x7f75eec2b1a2 0x7f75edcfb23c 0x7f75ee5c2022",
                "[mutex.cc : 452] RAW: Lock returning 0x55a73eff0b70   @ 0x7f75eec2b1a2 0x7f75edcfb23c",
                "[mutex.cc : 452] RAW: Unlock 0x55a73eff0b70   @ 0x7f75ee5c2125 0x7f75eec4c3b0"]
# And the GCS's line when it killed an actor whose process had gone already (a watch's stderr, as a
# cycle stopped its encoder actors).
KILLED_GONE = ("[2026-12-08 00:36:20,792 E 6998 6998] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
               "8eeaf85bc21b4a78efc62d8701000000, status: Invalid: KillActor RPC failed for actor "
               "8eeaf85bc21b4a78efc62d8701000000: RpcError: RPC error: Socket closed rpc_code: 14")
OWN_LINE = "a line the task printed itself"
PRINTED = "\n".join(ABSEIL_TRACE + [KILLED_GONE, OWN_LINE])
WORKER_PRINTS = f"""
import sys, time
from workers.ray_session import init_ray
init_ray(None)
import ray

@ray.remote
def task():
    print({PRINTED!r}, file=sys.stderr, flush=True)

ray.get(task.remote())
# The driver prints forwarded lines as they come, and stops at shutdown: wait until the task's own
# line is in this process's stderr (a file; the lines to skip came in the same write, before it).
deadline = time.time() + 60
while time.time() < deadline and {OWN_LINE!r} not in open("/proc/self/fd/2", errors="replace").read():
    time.sleep(0.1)
ray.shutdown()
"""


@pytest.mark.parametrize("line, skipped", [
    (ABSEIL_TRACE[0], True),
    (KILLED_GONE, True),
    # the GCS's other words for a kill that found the process going (its message is grpc's)
    (KILLED_GONE.replace("Socket closed rpc_code: 14", "failed to connect to all addresses"), True),
    # the raylet's notice of a call retried after the job killed its actor: retries are counted
    ("(raylet) Task EncoderActor.encode_unit failed. There are 4 retries remaining, so the task will be retried. "
     "Error: The actor is dead because it was killed by `ray.kill`.", True),
    ("(raylet) Task EncoderActor.encode_unit failed. There are infinite retries remaining, so the task will be "
     "retried. Error: The actor is dead because it was killed by `ray.kill`.", True),
    # a call retried because the actor's process died is news: shown
    ("(raylet) Task EncoderActor.encode_unit failed. There are 4 retries remaining, so the task will be retried. "
     "Error: The actor died unexpectedly before finishing this task.", False),
    (OWN_LINE, False),
])
def test_worker_noise_is_what_ray_is_told_to_skip(line, skipped):
    from workers.ray_session import WORKER_NOISE

    assert bool(re.search(WORKER_NOISE, line)) is skipped


def test_abseil_mutex_traces_from_a_worker_are_not_forwarded_and_its_own_lines_are(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)  # the command sets it itself
    with Job(["-c", WORKER_PRINTS], tmp_path) as job:
        rc, out, err = job.run()
    assert rc == 0, err
    plain = re.sub(r"\x1b\[[0-9;]*m", "", err)  # Ray colours the prefix
    assert len(re.findall(rf"^\(task pid=\d+\) {OWN_LINE}$", plain, re.M)) == 1, err
    assert "mutex.cc" not in err and "RAW:" not in err and "KillActor" not in err, err


@pytest.mark.parametrize("command", [["jobs.history"], ["jobs.inspect_dataset", "--json"], ["jobs.cli", "history"]])
def test_a_reader_that_went_away_ends_the_command_quietly(clean_run, lake, tmp_path, command):
    """`quantlake history DEST | head -1`: stdout's reader is gone before the command writes (the
    pipe's read end is closed first, so the write fails every time), and the command exits as a
    Unix tool ended by SIGPIPE does, 141, with nothing on stderr."""
    assert clean_run[0] == 0
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", command[0], *command[1:], str(lake / "dest")], cwd=REPO,
                              stdout=write, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, b"")


def test_ctrl_c_during_an_ingest_prints_one_line_and_exits_130(lake, tmp_path, as_by_hand):
    """Ctrl-C (SIGINT to the job's process group, Ray's processes included, as a terminal sends
    it) once the main pass has started: one line, status 130, nothing committed, Ray stopped."""
    # (Reads held in the main pass until the signal made Ray's core worker print "Failed to push
    # error to driver" for them as the job stopped: a Ctrl-C amid long reads shows that line.)
    with Job(["-m", "jobs.cli", "ingest", str(lake / "lake"), str(tmp_path / "dest"), *ARGS], tmp_path,
             env=as_by_hand) as job:
        proc = job.start()
        deadline = time.monotonic() + 300
        while "ingest:" not in job.output()[1] and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        out, err = job.output()
    assert (rc, out) == (130, ""), err
    assert [s for s in re.split(r"[\r\n]", err) if s.strip() and not BAR.fullmatch(s.strip())] == \
        ["quantlake ingest: interrupted"], err
    assert not (tmp_path / "dest" / "versions").exists()
