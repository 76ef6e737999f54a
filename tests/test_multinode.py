"""Many nodes on one machine: a Ray cluster of a head, a CPU worker and a GPU worker
(`ray.cluster_utils.Cluster`), where encoder actors run only on the GPU node, reads and writes
only on the others, and a worker node removed mid-job still leaves a complete version with
every document once, equal byte for byte to a single-node run's.

The cluster cannot share a process with the session's Ray, so it runs in a job of its own
(`isolated.Job`). The single-node run is the session's `small_dataset` (its lake, options and
ranges; 5 work units, 2 rows rejected). The GPU node advertises `GPU: 1` without a CUDA device,
so its encoder falls back to the CPU (device auto): placement is Ray's, the bits are the CPU's.
Real parts throughout: Ray, the bundled model, Parquet, JSON Lines, FAISS.
"""
import json
import os

from isolated import Job
from lakes import committed_ids

UNITS = 5  # small_dataset's: 2 Parquet files of 45 rows in units of 40 and 5 rows, 1 JSON Lines file

# The job: one cluster, one ingest with the reference's ranges (calibration would only add the
# sample's encoding, on the same encoder actor), which loses the CPU worker node while that node
# reads a unit (each read is slowed down, here only, and one on that node never ends; the
# head's CPU is held until then). One run keeps the test cheap:
# placement and bytes are checked on the run that lost a node.
CLUSTER_JOB = r"""
import json, os, sys, threading, time, uuid
import ray
from ray.cluster_utils import Cluster
import jobs.ingest as ingest
import workers.ingest.pipeline as pipeline
from workers.embedding.encoder import EncoderConfig
from workers.ingest.config import IngestConfig
from workers.ray_session import WORKER_ENV

lake, out, markers, ranges = sys.argv[1:5]
t0 = time.perf_counter()
os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)  # where Cluster records itself
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cpu = cluster.add_node(num_cpus=1)
cpu_id = cpu.node_id  # (the node object does not travel into tasks)
gpu = cluster.add_node(num_cpus=1, num_gpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": WORKER_ENV})
report = {"head": cluster.head_node.node_id, "cpu": cpu.node_id, "gpu": gpu.node_id,
          "seconds": {"cluster": time.perf_counter() - t0}}

# The head's CPU is held until the CPU worker is removed, so the job's first reads run on that
# worker: left to itself, Ray may run every read on the head (the driver's node), and the node
# would then be removed with nothing of the job's on it, or never.
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True
hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
    cluster.head_node.node_id, soft=False)).remote()
ray.get(hold.ready.remote())

def cfg(dest):
    # small_dataset's options; fp32 since the GPU node has no CUDA (`auto` means fp16 for a GPU pool)
    return IngestConfig(lake, os.path.join(out, dest), id_column="id", calibration_samples=50, ranges=ranges,
                        unit_rows=40, encoder=EncoderConfig(batch_size=32, precision="fp32"), progress=False)

read_unit = pipeline.read_unit
def slow_read(item, cfg):  # defined in __main__: pickled by value into the Ray tasks
    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(markers, node + "-" + uuid.uuid4().hex), "w"):
        pass
    time.sleep(600 if node == cpu_id else 1.5)  # a read on the CPU worker ends with the node
    return read_unit(item, cfg)
pipeline.read_unit = slow_read

def remove_cpu_node_while_it_reads():
    while not any(n.startswith(cpu.node_id) for n in os.listdir(markers)):
        time.sleep(0.05)
    shards = os.path.join(out, "removed", "shards")
    report["sidecars_at_removal"] = len([n for n in os.listdir(shards) if n.endswith(".json")]) \
        if os.path.isdir(shards) else 0
    cluster.remove_node(cpu)
    report["removed"] = cpu.node_id
    ray.kill(hold)  # the head takes the job's CPU work from here

remover = threading.Thread(target=remove_cpu_node_while_it_reads, daemon=True)
remover.start()
t0 = time.perf_counter()
report["removed_run"] = ingest.run(cfg("removed")).summary
report["seconds"]["removed"] = time.perf_counter() - t0
remover.join(timeout=5)
report["alive_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

# The GPUs an encoder's tokenizer threads share the node's cores with (`gpus_on_this_node`),
# asked on each kind of node; a node of two GPUs (and no CPU: no job work) is added for it.
from workers.embedding.encoder import gpus_on_this_node
two = cluster.add_node(num_cpus=0, num_gpus=2)
cluster.wait_for_nodes()
ask = ray.remote(gpus_on_this_node)
report["gpus_on_node"] = {kind: ray.get(ask.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
    node.node_id, soft=False)).remote()) for kind, node in (("two", two), ("gpu", gpu), ("head", cluster.head_node))}
report["gpus_on_node"]["driver"] = gpus_on_this_node()
ray.shutdown()
cluster.shutdown()
print(json.dumps(report))
"""


def _manifest(dest) -> dict:
    """Version 1's manifest without what differs between two runs of the same work: when, who,
    timings, and the source URL's folder."""
    m = json.loads((dest / "versions" / "00000001.json").read_text())
    out = {k: v for k, v in m.items() if k not in ("created_at", "writer")}
    out["shards"] = [{**s, "stats": {"rows_read": s["stats"]["rows_read"]}} for s in m["shards"]]
    return out


def _same_files(a, b, manifest: dict) -> None:
    for s in manifest["shards"]:
        for name in (s["path"], s["index"]) + ((s["rejects"]["path"],) if s["rejects"] else ()):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cluster_places_stages_by_node_kind_and_survives_a_lost_node_with_the_single_node_bytes(
        small_dataset, tmp_path):
    single, result = small_dataset
    assert result.version == 1
    ranges = single / "ranges" / f"{result.summary['ranges_id']}.json"
    markers = tmp_path / "markers"
    markers.mkdir()
    with Job(["-c", CLUSTER_JOB, str(single.parent / "lake"), str(tmp_path), str(markers), str(ranges)],
             tmp_path) as job:
        rc, out, err = job.run(timeout_s=480)
    assert rc == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    head, cpu, gpu = report["head"], report["cpu"], report["gpu"]
    assert len({head, cpu, gpu}) == 3

    # Placement: every unit encoded on the GPU node, read and written only on the CPU nodes; a
    # read started on the CPU worker (its marker), which was then removed mid-job.
    got = report["removed_run"]
    assert got["nodes"]["encode"] == {gpu: UNITS}, report["seconds"]
    for step in ("read", "write"):
        assert sum(got["nodes"][step].values()) == UNITS and set(got["nodes"][step]) <= {head, cpu}, got["nodes"]
    assert any(m.startswith(cpu) for m in os.listdir(markers))
    assert got["nodes"]["read"] == {head: UNITS}, got["nodes"]  # those the lost node held read again
    assert not any(m.startswith(gpu) for m in os.listdir(markers))
    assert report["removed"] == cpu and cpu not in report["alive_after"]
    assert report["sidecars_at_removal"] < UNITS, "the node was removed after the job's work was done"

    # The job finished on the nodes left, with every document exactly once and the same bytes
    # as the single-node run.
    dest = tmp_path / "removed"
    assert (got["documents"], got["rejects"], got["shards"], got["shards_reused"]) == (91, 2, UNITS, 0)
    ids = committed_ids(str(dest), {})
    assert ids == committed_ids(str(single), {}) and len(set(ids)) == len(ids) == 91
    want = _manifest(single)
    assert _manifest(dest) == want
    _same_files(single, dest, want)
    assert not [p for p in os.listdir(dest / "shards") if p.startswith(".tmp-")]

    # Each process counts the GPUs of its own node, at least one.
    assert report["gpus_on_node"] == {"two": 2, "gpu": 1, "head": 1, "driver": 1}
