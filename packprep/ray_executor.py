"""Ray executor: the build's stage functions as Ray tasks on a cluster (or a local Ray runtime).

    executor = RayExecutor(address="auto")            # or RAY_ADDRESS; None starts a local runtime
    for result in executor.imap(tokenize_task, tasks, ctx): ...

Same contract as `LocalExecutor.imap`: every task runs once, results come back as they finish and the build orders
them by task index, so the bytes equal the local executor's. The context is put in Ray's object store once; at most
`2 x cluster CPUs` tasks are in flight, so a million-task build does not flood the scheduler. Tasks read and write the
output folder directly, so on a multi-node cluster OUT and the inputs must be on a shared filesystem (NFS, Lustre,
a FUSE-mounted bucket). Cost: ~5 ms scheduling per task, a few seconds to connect or start a runtime.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator


def _import_ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError('the Ray executor needs Ray: pip install "packprep[ray]"') from e
    return ray


def _run(fn, task, ctx):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Ray CPU per task: the cluster is the parallelism
    return fn(task, ctx)


def _get(ray, refs):
    """ray.get, re-raising a task's own exception (a user error stays one clear line, not a remote traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


class RayExecutor:
    """Run stage functions as Ray tasks. address: a Ray cluster ("auto", "ray://host:10001") or None (local)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self._started = False

    def _init(self):
        ray = _import_ray()
        if not ray.is_initialized():
            # Workers import the stage functions by name: packprep must be installed on every node (pipelines/).
            kwargs = dict(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
            from packprep.storage import ENV  # --storage-options reach the tasks' filesystems too

            if os.environ.get(ENV):
                kwargs["runtime_env"] = {"env_vars": {ENV: os.environ[ENV]}}
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, **kwargs)
            self._started = True
        return ray

    def imap(self, fn: Callable, tasks: Iterable, ctx: object) -> Iterator:
        ray = self._init()
        remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(_run)
        fn_ref, ctx_ref = ray.put(fn), ray.put(ctx)
        limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending = []
        try:
            for task in tasks:
                pending.append(remote.remote(fn_ref, task, ctx_ref))
                if len(pending) >= limit:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield from _get(ray, done)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield from _get(ray, done)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def shutdown(self) -> None:
        if self._started:
            _import_ray().shutdown()
            self._started = False
