"""Executors: run one stage function over a list of tasks and yield results as they finish.

    for result in LocalExecutor(workers=4).imap(tokenize_task, tasks, ctx): ...

The build calls stage functions `fn(task, ctx) -> result` that are pure module-level functions, idempotent
(a finished task's output is recognised and reused) and independent of where they run, and it orders results by
task index itself, so any executor that runs each task once gives the same bytes. `LocalExecutor` runs them in this
process (workers=1) or in a pool of worker processes (fork on Linux: a worker starts in milliseconds; the
workers inherit the tokenizer the driver loaded, and a spawned or Ray worker loads its own on its first task, the
tiktoken rank table from the cache folder the driver filled (`packprep.cache`), not rebuilt;
`TOKENIZERS_PARALLELISM=false` so each worker uses one core). A cluster executor (Ray) implements the same `imap`.
A worker killed by the OS (the OOM killer) ends the build with `WorkerDiedError`, one line that says to rerun the
same command. Costs: one pickle of (task, ctx) and of the small result per task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def imap(self, fn: Callable[[T, object], R], tasks: Iterable[T], ctx: object) -> Iterator[R]:
        """Run fn(task, ctx) for every task; yield each result as it finishes (any order)."""
        ...


def _init_worker(driver_pid: int | None = None) -> None:
    _die_with(driver_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    import pyarrow as pa

    pa.set_cpu_count(1)  # likewise for pyarrow's JSON/CSV readers
    pa.set_io_thread_count(1)


def _die_with(driver_pid: int | None) -> None:
    """Linux: SIGKILL this worker when its driver dies. A driver killed alone (OOM killer, kill -9) otherwise leaves
    its pool workers blocked on the task queue forever, holding memory and the output folder's lock."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if driver_pid is not None and os.getppid() != driver_pid:  # the driver died before prctl took effect
        os._exit(1)


class WorkerDiedError(OSError):
    """A worker process was killed (the OOM killer, a signal, a crash in native code); the build is resumable."""


class LocalExecutor:
    """Worker processes on this machine (workers=1: in this process, the easiest to debug)."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def imap(self, fn, tasks, ctx):
        tasks = list(tasks)
        if self.workers == 1 or len(tasks) <= 1:
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                for task in tasks:
                    yield fn(task, ctx)
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        workers = min(self.workers, len(tasks))
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            # At most 2 tasks in flight per worker: results stream back while the rest wait their turn.
            pending, queue = set(), iter(tasks)
            try:
                for task in queue:
                    pending.add(pool.submit(fn, task, ctx))
                    if len(pending) >= 2 * workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        yield from (f.result() for f in done)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            except BrokenProcessPool:
                raise WorkerDiedError("a worker process died (killed by the OS: out of memory? `dmesg` tells); rerun "
                                      "the same command to resume (finished tasks are kept), with fewer --workers if "
                                      "memory is short") from None
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def make_executor(name: str = "local", workers: int = 1, ray_address: str | None = None) -> Executor:
    """The executor a build asks for by name: 'local' (worker processes) or 'ray' (Ray tasks)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        from packprep.ray_executor import RayExecutor

        return RayExecutor(address=ray_address, num_cpus=None if ray_address else workers)
    raise ValueError(f"unknown executor {name!r}; expected: local, ray")
