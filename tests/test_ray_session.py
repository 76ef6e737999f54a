"""Which Ray a job runs on: a local instance unless told otherwise, and never a hang on a dead cluster.

A real head (`ray start --head`, private temp dir, free ports) is killed with SIGKILL, which
leaves its address recorded where a bare `ray.init()` would find and retry it for ever.
"""
import json
import os
import time
from types import SimpleNamespace

import pytest

from conftest import free_ports, write_parquet_lake
from isolated import Job
from workers.ray_session import RayUnreachable, check_address, choose_address

RECORD = os.path.join("ray", "ray_current_cluster")  # under RAY_TMPDIR, where `ray start` writes it


@pytest.fixture(scope="module")
def dead_cluster(tmp_path_factory):
    """A head started by `ray start` in a private RAY_TMPDIR, then killed: its record stays."""
    flags = ("--port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")
    ports = dict(zip(flags, free_ports(len(flags))))
    args = ["-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
            "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items())]
    with Job(args, tmp_path_factory.mktemp("head")) as head:
        head.start()
        record = os.path.join(head.ray_tmp, RECORD)
        deadline = time.monotonic() + 300
        while not os.path.exists(record) and head.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert os.path.exists(record), f"ray start did not come up: {head.output()}"
        with open(record) as f:
            address = f.read().strip()
        assert address.endswith(f":{ports['--port']}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", head.ray_tmp)
            while_alive = (check_address(address, {}), check_address("auto", {}))
        head.stop()  # SIGKILL to every process of the head: nothing clears its record
        with open(record) as f:
            assert f.read().strip() == address
        yield SimpleNamespace(address=address, ray_tmp=head.ray_tmp, record=record, while_alive=while_alive)


def _lake(tmp_path, docs):
    write_parquet_lake(tmp_path / "lake", docs[:24], files=1, row_group_size=12)
    return tmp_path / "lake"


def _ingest(tmp_path, docs, *extra):
    return ["-m", "jobs.ingest", str(_lake(tmp_path, docs)), str(tmp_path / "dest"), "--id-column", "id",
            "--calibration-samples", "24", "--no-progress", "--json", *extra]


def test_the_rule_flag_then_environment_then_a_local_instance():
    assert choose_address(None, {}) == ("local", "default")
    assert choose_address(None, {"RAY_ADDRESS": " "}) == ("local", "default")
    assert choose_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert choose_address("10.0.0.2:6379", {"RAY_ADDRESS": "10.0.0.1:6379"}) == ("10.0.0.2:6379", "--ray-address")
    assert check_address(None, {}) == "local"
    assert check_address(None, {"RAY_ADDRESS": "local"}) == "local"


@pytest.mark.parametrize("address, message", [
    ("http://head:8265", r"Ray address 'http://head:8265' \(--ray-address\) is a dashboard URL, which "
                         r"`ray job submit --address` takes; a job joins a cluster by its GCS address"),
    ("head", r"Ray address 'head' \(--ray-address\) is not host:port, ray://host:port, 'auto' or 'local'"),
    ("ray://head:port", r"is not host:port"),
])
def test_an_address_ray_init_cannot_take_is_refused(address, message):
    with pytest.raises(ValueError, match=message):
        check_address(address, {})


def test_a_live_cluster_is_joined_by_its_address_and_by_auto(dead_cluster):
    assert dead_cluster.while_alive == (dead_cluster.address, dead_cluster.address)


def test_a_dead_address_fails_at_once_naming_it_and_the_fix(dead_cluster):
    t0 = time.monotonic()
    for address, env, source in [(dead_cluster.address, {}, "--ray-address"),
                                 (None, {"RAY_ADDRESS": dead_cluster.address}, "RAY_ADDRESS"),
                                 (f"ray://{dead_cluster.address}", {}, "--ray-address")]:
        with pytest.raises(RayUnreachable) as err:
            check_address(address, env)
        assert str(err.value) == (
            f"no Ray cluster answers at {address or dead_cluster.address} ({source}): connection refused; "
            "start the cluster, or pass the address of a running one, or leave out --ray-address and "
            "unset RAY_ADDRESS to run on a new local instance")
    assert time.monotonic() - t0 < 5


def test_auto_names_the_stale_record_and_how_to_clear_it(dead_cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", dead_cluster.ray_tmp)
    for address, env in [("auto", {}), (None, {"RAY_ADDRESS": "auto"})]:
        with pytest.raises(RayUnreachable, match=(
                rf"no Ray cluster answers at {dead_cluster.address} \('auto': the cluster recorded in "
                rf"{dead_cluster.record}\): connection refused; that cluster is gone \(its head was stopped "
                rf"or killed, or the machine restarted\): run `ray stop` to clear {dead_cluster.record}")):
            check_address(address, env)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` recorded here
    with pytest.raises(RayUnreachable, match=r"the Ray address is 'auto', but no `ray start` on this machine "
                                             rf"recorded a cluster \({tmp_path}/ray/ray_current_cluster is missing"):
        check_address("auto", {})


def test_ingest_without_an_address_runs_locally_despite_the_dead_record(dead_cluster, docs, tmp_path):
    with Job(_ingest(tmp_path, docs), tmp_path) as job:
        # The job's own RAY_TMPDIR holds the dead head's record, where a bare ray.init() looks.
        os.makedirs(os.path.join(job.ray_tmp, "ray"))
        with open(os.path.join(job.ray_tmp, RECORD), "w") as f:
            f.write(dead_cluster.address)
        rc, out, err = job.run(timeout_s=480)
        assert rc == 0, err
        assert dead_cluster.address not in err and "Failed to connect to GCS" not in err
    summary = json.loads(out)
    assert (summary["version"], summary["documents"], summary["rejects"]) == (1, 24, 0)
    assert sorted(os.listdir(tmp_path / "dest" / "versions")) == ["00000001.json"]


def test_ingest_with_a_dead_address_fails_fast_and_commits_nothing(dead_cluster, docs, tmp_path):
    with Job(_ingest(tmp_path, docs, "--ray-address", dead_cluster.address), tmp_path) as job:
        rc, _, err = job.run(timeout_s=240)  # a hang raises TimeoutExpired
    assert rc == 1, err
    assert err.strip().splitlines()[-1] == (
        f"quantlake ingest: error: RayUnreachable: no Ray cluster answers at {dead_cluster.address} "
        "(--ray-address): connection refused; start the cluster, or pass the address of a running one, "
        "or leave out --ray-address and unset RAY_ADDRESS to run on a new local instance")
    assert "Failed to connect to GCS" not in err
    assert not (tmp_path / "dest").exists()


def test_a_submitted_jobs_own_env_vars_are_not_set_twice():
    """Ray refuses a job whose driver's runtime env sets a variable the job's already sets."""
    import json

    from ray._private.worker import _merge_runtime_env

    from workers.ray_session import WORKER_ENV, worker_env

    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "OTHER": "x"}}}
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    assert _merge_runtime_env(job["runtime_env"], {"env_vars": WORKER_ENV}) is None  # what failed
    mine = worker_env(env)
    assert "HF_HUB_OFFLINE" not in mine and set(mine) == set(WORKER_ENV) - {"HF_HUB_OFFLINE"}
    assert _merge_runtime_env(job["runtime_env"], {"env_vars": mine})["env_vars"] == {**mine, **job["runtime_env"]["env_vars"]}
    assert worker_env({}) == WORKER_ENV == worker_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"})


_PROBE = """
import json, os, ray
from workers.ray_session import WORKER_ENV, init_ray
before = {k: os.environ.get(k) for k in WORKER_ENV}
assert init_ray(None)
seen = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in WORKER_ENV}).remote())
node = ray._private.worker.global_worker.node
print(json.dumps({"before": before, "after": {k: os.environ.get(k) for k in WORKER_ENV}, "worker": seen,
                  "webui": node.address_info.get("webui_url"), "cpus": ray.cluster_resources()["CPU"]}))
ray.shutdown()
"""


def test_a_local_instance_gives_its_workers_the_env_and_starts_no_dashboard(tmp_path, monkeypatch):
    from workers.ray_session import DASHBOARD_ENV, WORKER_ENV, local_dashboard

    monkeypatch.delenv(DASHBOARD_ENV, raising=False)
    for k in WORKER_ENV:
        monkeypatch.delenv(k, raising=False)
    with Job(["-c", _PROBE], tmp_path) as job:
        rc, out, err = job.run(timeout_s=240)
    assert rc == 0, err
    got = json.loads(out)
    assert got["worker"] == WORKER_ENV  # through the job's runtime env
    assert got["before"] == got["after"] == {k: None for k in WORKER_ENV}  # the driver's own is left alone
    assert not got["webui"]  # no dashboard
    from ray._private.utils import get_num_cpus

    assert got["cpus"] == max(2, get_num_cpus())  # Ray's count, and never under 2 (`local_cpus`)
    assert [local_dashboard(e) for e in ({}, {DASHBOARD_ENV: "0"}, {DASHBOARD_ENV: "1"})] == [False, False, True]


def test_a_local_instance_advertises_at_least_two_cpus():
    """One for the encoder actor, one for the tasks beside it: on a one-CPU machine a local
    instance of one CPU would leave the scan waiting for ever (they share the core instead)."""
    from ray._private.utils import get_num_cpus

    from workers.ray_session import MIN_LOCAL_CPUS, local_cpus

    assert MIN_LOCAL_CPUS == 2
    assert [local_cpus(n) for n in (1, 2, 3, 64)] == [2, None, None, None]  # None: Ray's own count
    assert local_cpus() == (2 if get_num_cpus() < 2 else None)  # this machine, as Ray counts it
