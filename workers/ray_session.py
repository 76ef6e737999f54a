"""Which Ray instance a job runs on: the one rule, and a fast, clear failure when that instance is gone.

The rule:
- no `--ray-address` and no RAY_ADDRESS: start a new local instance (`address="local"`).
  A bare `ray.init()` would instead join the cluster recorded by the last `ray start` on
  the machine, and when that cluster is dead (its head killed, the machine restarted)
  it retries for ever, printing "Failed to connect to GCS";
- an address (the flag wins over RAY_ADDRESS): join that cluster. `host:port` is its GCS,
  `ray://host:port` its Ray Client server; `auto` means the cluster recorded by the last
  `ray start` on this machine; `local` starts a local instance as with no address.
  Ray itself retries an unreachable address for a long time, so the address is first
  checked with one TCP connection and a short timeout, and an error names it and the fix.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from typing import Mapping

from workers.lake.redact import redact_url

ADDRESS_ENV = "RAY_ADDRESS"
# Environment of every process that loads a model (Ray workers, and a driver that encodes
# queries): never reach a model hub, and no per-process weight-loading bars flooding the
# driver's console. `init_ray` gives it to the workers; `apply_worker_env` to this process.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
# A local instance advertises at least this many CPUs: the encoder actor keeps one for the whole
# job, and a scan task needs another (on a one-CPU machine they then share it).
MIN_LOCAL_CPUS = 2
# How long the GCS (or Ray Client server) gets to accept a TCP connection before the job gives up.
CONNECT_TIMEOUT_S = 10.0
# Lines from Ray's worker processes that the driver does not print: abseil's mutex debug trace,
# which a worker now and then writes to stderr ("[mutex.cc : 452] RAW: Lock blocking 0x... @ ...",
# three lines in a row in a failing ingest's output here), news to no one and alarming to read.
# Also the raylet's notice that a call queued at an encoder actor will be retried after the job
# itself killed the actor (`Encoders.stop(kill=True)`: a Ctrl-C while a unit is being encoded;
# a running actor call cannot be cancelled), which is then not retried (`no_restart`). And the
# GCS's notice that its call to kill an actor failed to reach the actor's process ("KillActor RPC
# failed ...: RpcError: ...", "Socket closed" when the process was gone already, other words when
# it went mid-call), now and then when a job stops its encoder actors: what it wanted.
# Ray's driver reads RAY_DEDUP_LOGS_SKIP_REGEX when `ray` is first imported, so it is set when this
# module is, which every command imports before Ray; one set by the user is kept.
WORKER_NOISE = (r"\[mutex\.cc : \d+\] RAW: "
                r"|Task EncoderActor\.\w+ failed\. There are (?:infinite|\d+) retries remaining, "
                r"so the task will be retried\. Error: The actor is dead because it was killed by `ray\.kill`"
                r"|KillActor RPC failed for actor [0-9a-f]+: RpcError: ")
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", WORKER_NOISE)


class RayUnreachable(ConnectionError):
    """The Ray cluster the job was told to join does not answer at its address."""


def choose_address(address: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """`(address, where it came from)`: the flag, else RAY_ADDRESS, else `("local", "default")`."""
    environ = os.environ if environ is None else environ
    if address:
        return address.strip(), "--ray-address"
    if environ.get(ADDRESS_ENV, "").strip():
        return environ[ADDRESS_ENV].strip(), ADDRESS_ENV
    return "local", "default"


def recorded_address_file() -> str:
    """Where `ray start` records the cluster it started (under RAY_TMPDIR, TMPDIR or /tmp)."""
    # Ray's own helper, so the file is the one `ray start` writes and `ray stop` clears; its
    # `ray.init(address="auto")` would read it too, but then retry a dead address for ever.
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def _recorded_address() -> tuple[str, str]:
    """The address the last `ray start` on this machine recorded, and the file it is in."""
    path = recorded_address_file()
    try:
        with open(path) as f:
            address = f.read().strip()
    except FileNotFoundError:
        address = ""
    if not address:
        raise RayUnreachable(
            f"the Ray address is 'auto', but no `ray start` on this machine recorded a cluster ({path} "
            "is missing or empty): start one with `ray start --head`, pass its host:port, or leave out "
            "--ray-address and unset RAY_ADDRESS to run on a new local instance")
    return address, path


def _host_port(address: str, source: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray address {redact_url(address)!r} ({source}) is not host:port, "
                         "ray://host:port, 'auto' or 'local'")
    return host.strip("[]"), int(port)


def check_address(address: str | None, environ: Mapping[str, str] | None = None,
                  timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """The address to pass to `ray.init`: `"local"`, or a cluster's that accepted a connection.

    Args:
        address: the `--ray-address` value (None: RAY_ADDRESS, else a new local instance).
        environ: where RAY_ADDRESS is read (default: this process's environment).
        timeout_s: how long the cluster gets to accept a TCP connection.

    Raises:
        RayUnreachable: nothing answers at the address; the message names it, where it came
            from, and what to do.
        ValueError: the address is not one `ray.init` takes.
    """
    address, source = choose_address(address, environ)
    if address == "local":
        return "local"
    if address.startswith(("http://", "https://")):
        raise ValueError(
            f"Ray address {redact_url(address)!r} ({source}) is a dashboard URL, which `ray job submit "
            "--address` takes; a job joins a cluster by its GCS address host:port (port 6379 by "
            "default) or its Ray Client address ray://host:port")
    recorded = None
    if address == "auto":
        address, recorded = _recorded_address()
        source = f"'auto': the cluster recorded in {recorded}"
    host, port = _host_port(address, source)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        why = (f"no answer within {timeout_s:g} s" if isinstance(exc, socket.timeout)
               else (exc.strerror or str(exc)).lower())
        if recorded:
            fix = (f"that cluster is gone (its head was stopped or killed, or the machine restarted): "
                   f"run `ray stop` to clear {recorded}, or start a cluster with `ray start --head`, or "
                   "leave out --ray-address and unset RAY_ADDRESS to run on a new local instance")
        else:
            fix = ("start the cluster, or pass the address of a running one, or leave out --ray-address "
                   "and unset RAY_ADDRESS to run on a new local instance")
        raise RayUnreachable(f"no Ray cluster answers at {redact_url(address)} ({source}): {why}; "
                             f"{fix}") from None
    return address


def apply_worker_env(environ=None) -> None:
    """Give this process `WORKER_ENV`, keeping any variable already set (the user's choice wins)."""
    environ = os.environ if environ is None else environ
    for key, value in WORKER_ENV.items():
        environ.setdefault(key, value)


def worker_env(environ=None) -> dict[str, str]:
    """`WORKER_ENV` less the variables a submitted job's runtime env sets itself.

    Inside `ray job submit`, `ray.init` merges its runtime env into the job's (passed in
    RAY_JOB_CONFIG_JSON_ENV_VAR) and refuses the whole job when both set one variable; the
    job's value wins here, as it does for `apply_worker_env`.
    """
    environ = os.environ if environ is None else environ
    try:
        job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        theirs = set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError, TypeError):
        theirs = set()
    return {k: v for k, v in WORKER_ENV.items() if k not in theirs}


def node_id() -> str:
    """The id of the Ray node this process runs on (a task or actor records where it ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def init_ray(address: str | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local instance; its workers
    run with `WORKER_ENV`.

    Returns True when this call initialised Ray (the caller then calls `ray.shutdown()` when
    done), False when Ray was already initialised in this process (inside a Ray job, or a
    test's session), which is then used as it is.

    Raises:
        RayUnreachable, ValueError: as `check_address`, before Ray starts anything.
    """
    import ray

    if ray.is_initialized():
        return False
    address = check_address(address)
    # A local instance is this job's alone, and runs without Ray's dashboard unless asked
    # (`local_dashboard`); a cluster keeps the dashboard it was started with.
    local = {"include_dashboard": local_dashboard(), "num_cpus": local_cpus()} if address == "local" else {}
    try:
        # Ray half started (a Ctrl-C inside `ray.init`) crashed the process at its exit: the start
        # is finished first, then stopped, and the interrupt goes on.
        with ctrl_c_held(), _quiet_token_notice(address == "local"):
            ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()},
                     **local)
    except KeyboardInterrupt:
        with ctrl_c_held():
            ray.shutdown()
        raise
    return True


# The logger of Ray's notice that a new local instance uses token authentication ("Token
# authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out...",
# a WARNING at every start when RAY_AUTH_MODE is unset; Ray >= 2.5x).
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet_token_notice(local: bool):
    """Keep Ray's token-authentication notice off the console while a local instance starts.

    The instance is the job's own, started and stopped by it: the token (~/.ray/auth_token,
    made once by Ray) guards it as Ray means it to, and its notice would be the only line on a
    clean run's stderr (README: nothing but the bar). Auth stays as Ray sets it; a cluster the
    job joins keeps Ray's messages, errors included (the logger still passes ERROR).
    """
    if not local:
        yield
        return
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) that comes while the block runs, and raise it as KeyboardInterrupt
    once the block is done: for the cleanup that must run whole, ending a job's actors and its Ray.

    Interrupted, that cleanup went wrong at random: a KeyboardInterrupt inside `ray.shutdown`
    left the driver's core worker up with its raylet stopped, and it ended the process with
    status 1 before the command could report the interrupt; one inside an actor handle's
    `__del__` was only printed ("Exception ignored in"), and the job went on to commit. Outside
    the main thread, or where SIGINT has a handler other than Python's default (`reindex
    --watch` sets its own), the block runs as it is. A block that raises keeps its exception
    (it is the job's: a Ctrl-C held meanwhile is dropped).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def local_cpus(detected: int | None = None) -> int | None:
    """The CPUs a local instance advertises: None (Ray counts them, cgroup limits included)
    unless Ray would count fewer than MIN_LOCAL_CPUS; then MIN_LOCAL_CPUS, logical ones, so that
    the job's tasks fit beside its encoder actor rather than wait for ever."""
    if detected is None:
        try:
            from ray._private.utils import get_num_cpus  # what Ray itself would advertise
            detected = get_num_cpus()
        except (ImportError, AttributeError):
            detected = os.cpu_count() or 1
    return MIN_LOCAL_CPUS if detected < MIN_LOCAL_CPUS else None


# Set to 1 to start a local instance with Ray's dashboard (http://127.0.0.1:8265).
DASHBOARD_ENV = "QUANTLAKE_RAY_DASHBOARD"


def local_dashboard(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a local instance starts Ray's dashboard: only when DASHBOARD_ENV is 1.

    The dashboard and the agents reporting to it take CPU for the whole job: on a 2-core
    machine an idle local instance with them slowed a bare encode by 9% (62.4 s -> 67.8 s),
    without them by 2% (63.7 s; README, Benchmarks). The job shows its own progress, and a
    cluster it joins keeps its own dashboard.
    """
    environ = os.environ if environ is None else environ
    return environ.get(DASHBOARD_ENV, "").strip() == "1"
