"""How Ray workers reach storage: the options travel in the object store, not in task arguments.

Why an object reference rather than the options themselves, or `runtime_env`:
- Task and actor arguments are serialised into the task specification, which Ray keeps
  for retries and lineage reconstruction and which debug dumps and tracebacks of failed
  tasks can show. A config holding a key or secret would be copied into every one of them.
- `runtime_env={"env_vars": ...}` is stored in the job table and shown by the dashboard
  and `ray job` commands; per task it would also start separate worker processes, and a
  job joining a running cluster (or the test session's Ray) cannot change the env of
  the workers it already has.
- A `ray.put` object is held by the driver (its owner) for the job's lifetime, is only
  reachable through the reference, and is read by the worker that dereferences it. The
  task argument is a `StorageAccess`: the reference plus a random token, nothing secret.

What travels: the fsspec `storage_options`, plus the driver's standard AWS variables
(`FORWARDED_ENV`), because s3fs/botocore read credentials, region and `AWS_ENDPOINT_URL`
from the environment and a worker's environment is the one its node was started with.
A worker sets those variables in its own process before it builds a filesystem and puts
back what it had when a later job does not forward them.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from workers.lake.storage import url_to_fs

FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")

_lock = threading.Lock()
_resolved: dict[str, dict[str, Any]] = {}  # token -> {"options", "env"}, per worker process
_filesystems: dict[tuple[str, str], tuple[Any, str]] = {}
_node_env: dict[str, str | None] = {}  # variables this process changed -> their value before


@dataclass(frozen=True, repr=False)
class StorageAccess:
    """A task argument that lets a worker build the job's filesystems; holds no secret itself.

    Args:
        ref: `ray.ObjectRef` of the JSON bytes `{"options": ..., "env": ...}`.
        token: random id of this job's options, the key of worker-side caches.
    """

    ref: Any
    token: str

    @classmethod
    def put(cls, options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> "StorageAccess":
        """Driver side: store `options` and the forwarded variables of `environ` in the object store.

        The driver must keep the returned value alive until the job's tasks are done.
        """
        import ray

        env = os.environ if environ is None else environ
        payload = {"options": dict(options or {}), "env": {k: env[k] for k in FORWARDED_ENV if k in env}}
        return cls(ray.put(json.dumps(payload).encode()), uuid.uuid4().hex)

    def __repr__(self) -> str:
        return f"StorageAccess(token={self.token[:8]}…, options in the object store)"

    def _payload(self) -> dict[str, Any]:
        with _lock:
            if self.token not in _resolved:
                import ray

                _resolved[self.token] = json.loads(ray.get(self.ref))
            return _resolved[self.token]

    def options(self) -> dict[str, Any]:
        """Worker side: the job's storage options, with the job's AWS variables in effect."""
        payload = self._payload()
        apply_env(payload["env"])
        return payload["options"]

    def url_to_fs(self, url: str):
        """Worker side: `(filesystem, path)` for `url`, built once per job and process."""
        options = self.options()
        key = (self.token, url)
        with _lock:
            if key not in _filesystems:
                # A fresh instance: fsspec's cache is keyed by options alone, and an instance
                # from an earlier job would keep that job's credentials from the environment.
                _filesystems[key] = url_to_fs(url, {**options, "skip_instance_cache": True})
            return _filesystems[key]


def apply_env(env: Mapping[str, str]) -> None:
    """Make this process's `FORWARDED_ENV` variables those of `env`, restoring the node's own
    value of any variable an earlier job set and this one does not."""
    with _lock:
        for var in FORWARDED_ENV:
            if var in env:
                _node_env.setdefault(var, os.environ.get(var))
                os.environ[var] = env[var]
            elif var in _node_env:
                before = _node_env.pop(var)
                if before is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = before
