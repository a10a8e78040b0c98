"""The one executor of every training the stages launch: local worker processes or Ray.

A stage describes each training as a :class:`Task`: the name of a module-level
function (``"d3m_lib.training:baseline_anchor"``), its inputs (a configuration
slice, rows or a kept mask, the seed inside the configuration, the output folder),
the key under which the stage's step record (:meth:`rundir.Stage.steps`) keeps it,
and the files it writes. :class:`Grid` runs a list of tasks and returns their
results in submission order, whatever order they finished in:

    with grid.Grid(stage, "05 D3M", progress=True) as g:
        results = g.run(tasks)       # [TaskResult(key, value, resumed, seconds), ...]

* **Deterministic.** A task seeds everything from its own inputs (the training
  functions seed torch from ``cfg.seed`` and draw batches from ``(seed, epoch)``),
  so its result does not depend on the worker that ran it or on the order. Every
  worker, and the driver when it runs tasks itself, uses ``grid_threads_per_worker``
  torch threads, so 1 and N workers give byte-identical files on CPU.
* **Resume.** A task whose step record holds the same signature and whose files
  exist is not run again (``resumed``: its function's value is not available; the
  stage reads its files). A task that runs invalidates the tasks listed ``after`` it.
  Each finished task is recorded at once, by the driver (workers never write the
  manifest), so a killed run resumes only the unfinished tasks.
* **Faults.** A task that raises is retried ``max_retries`` times; then the stage
  stops with :class:`TaskFailed`, naming the task and its error, after the tasks
  already running have finished and been recorded. A worker process that dies
  (killed, out of memory) breaks the local pool: the pool is restarted and the tasks
  that were in flight are resubmitted, each charged one attempt. On Ray a dead worker
  surfaces as an error of its task and is retried the same way.
* **Backends.** ``grid_backend: local`` with ``grid_workers`` = 1 runs tasks in this
  process; more workers are ``spawn`` processes (at most ``grid_workers`` tasks in
  flight, on CUDA one visible GPU per worker). ``ray`` sends every ready task to the
  cluster named by ``ray_address`` (null: a local Ray with ``grid_workers`` x
  ``grid_cpus_per_task`` CPUs), each asking for one GPU when the device is CUDA, else
  ``grid_cpus_per_task`` CPUs.
* **Progress.** One tqdm bar per :class:`Grid` (one per stage), over tasks, with the
  running count and the time left; on Ray the same bar on the driver.

An ``np.memmap`` argument (the image cache) travels as its file name, shape and
offset and is reopened read-only in the worker, never copied.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

AUTO_MAX_WORKERS = 8


class TaskFailed(RuntimeError):
    """A task failed ``1 + max_retries`` times; the stage stops (finished tasks stay recorded)."""

    def __init__(self, key: str, error: str, attempts: int):
        last = next((ln for ln in reversed(error.strip().splitlines()) if ln.strip()), error)
        super().__init__(f"training task {key!r} failed {attempts} time(s): {last.strip()}\nThe stage stops here; "
                         f"finished tasks are kept and a re-run resumes them. Last error:\n{error}")
        self.key, self.error, self.attempts = key, error, attempts


@dataclass(frozen=True)
class Task:
    """One training: ``fn(**kwargs)`` with ``fn`` a ``"module:function"`` name.

    key: unique within the stage; the step record's entry (``"<finding>/seed0/anchor"``).
    signature: what must match for a recorded task to count as done (e.g. a kept-mask hash).
    files: outputs that must exist for a recorded task to count as done.
    after: keys of tasks (in the same :meth:`Grid.run` call) that must finish first; when one
      of them runs, this task runs too.
    """

    key: str
    fn: str
    kwargs: dict = field(default_factory=dict)
    signature: Any = None
    files: tuple = ()
    after: tuple = ()


@dataclass
class TaskResult:
    key: str
    value: Any = None          # what fn returned (None when resumed)
    resumed: bool = False      # recorded as done before; not run
    seconds: float = 0.0
    attempts: int = 0


# -- what travels to a worker ---------------------------------------------------------------
@dataclass(frozen=True)
class MemmapRef:
    """A read-only ``np.memmap`` by file name: reopened in the worker instead of being copied."""

    filename: str
    dtype: str
    shape: tuple
    offset: int

    def open(self) -> np.memmap:
        key = (self.filename, self.dtype, self.shape, self.offset)
        if key not in _OPEN:
            _OPEN[key] = np.memmap(self.filename, dtype=self.dtype, mode="r", shape=self.shape, offset=self.offset)
        return _OPEN[key]


_OPEN: dict = {}


def _pack(v):
    if isinstance(v, np.memmap) and getattr(v, "filename", None) and v.flags.c_contiguous:
        return MemmapRef(str(v.filename), v.dtype.str, tuple(v.shape), int(v.offset))
    return v


def _unpack(v):
    return v.open() if isinstance(v, MemmapRef) else v


def resolve(fn: str) -> Callable:
    """The function named ``"module:function"``."""
    mod, _, name = fn.partition(":")
    if not name:
        raise ValueError(f"task function {fn!r} must be 'module:function'")
    return getattr(importlib.import_module(mod), name)


def _set_threads(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(int(n))
    return before


def execute(fn: str, kwargs: dict, threads: int = 0):
    """Run one task (in a worker or in this process) with ``threads`` torch threads."""
    before = _set_threads(threads)
    try:
        return resolve(fn)(**{k: _unpack(v) for k, v in kwargs.items()})
    finally:
        _set_threads(before)


def _worker_init(threads: int, devices) -> None:
    if devices is not None:   # one visible GPU per local worker
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or 1))
    _set_threads(threads)


# -- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    workers: int = 1
    backend: str = "local"
    threads: int = 1
    cpus_per_task: float = 1.0
    max_retries: int = 1
    ray_address: str | None = None
    gpu: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        """The grid parameters of a configuration (``grid_workers`` null: :func:`auto_workers`)."""
        v = cfg.values if hasattr(cfg, "values") else dict(cfg)
        from .training import resolve_device

        gpu = resolve_device(v.get("device", "auto")).type == "cuda"
        threads = v.get("grid_threads_per_worker")
        workers = v.get("grid_workers")
        workers = int(workers) if workers else auto_workers(int(threads or 1), gpu)
        if not threads:   # CPU: one thread per training; CUDA: the cores shared among the workers (data loading)
            threads = max(1, _cpus() // workers) if gpu else 1
        threads = int(threads)
        return cls(workers=workers,
                   backend=v.get("grid_backend", "local"), threads=threads,
                   cpus_per_task=float(v.get("grid_cpus_per_task") or 1),
                   max_retries=int(v.get("max_retries", 1)), ray_address=v.get("ray_address"), gpu=gpu)


def auto_workers(threads: int = 1, gpu: bool = False) -> int:
    """``grid_workers: null``: one worker per GPU on CUDA, else one per ``threads`` CPU cores (at most 8)."""
    if gpu:
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, min(AUTO_MAX_WORKERS, _cpus() // max(1, threads)))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -- the executor --------------------------------------------------------------------------------
class Grid:
    """Runs a stage's tasks; one progress bar and one pool for all of the stage's :meth:`run` calls.

    ``stage``: a :class:`rundir.Stage` (its step record keeps finished tasks) or None (no resume
    record: every task runs). ``settings``: default :meth:`Settings.from_config` of ``stage.cfg``.
    """

    def __init__(self, stage=None, desc: str = "tasks", progress: bool = False, settings: Settings | None = None,
                 log: Callable[[str], None] | None = None):
        from tqdm.auto import tqdm

        if settings is None:
            settings = Settings.from_config(stage.cfg)
        if settings.backend not in ("local", "ray"):
            raise ValueError(f"parameter 'grid_backend' must be 'local' or 'ray', got {settings.backend!r}")
        self.stage, self.s, self.log = stage, settings, log
        self.steps = stage.steps() if stage is not None else None
        self.bar = tqdm(total=0, desc=desc, unit="task", disable=not progress)
        self._pool = None
        self._ray_fn = None

    # context manager: the pool lives as long as the stage's grid
    def __enter__(self) -> "Grid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.bar.close()

    # -- the step record ---------------------------------------------------------------------
    def _done(self, t: Task) -> bool:
        return self.steps is not None and self.steps.done(t.key, t.signature, files=tuple(t.files))

    def _mark(self, t: Task) -> None:
        if self.steps is not None:
            self.steps.mark(t.key, t.signature)

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    # -- run ------------------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task]) -> list[TaskResult]:
        """Run ``tasks`` (resuming recorded ones); their results in the order given."""
        tasks = list(tasks)
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"task keys must be unique within a run, repeated: {dup[:5]}")
        index = {t.key: i for i, t in enumerate(tasks)}
        for t in tasks:
            bad = [a for a in t.after if a not in index or index[a] >= index[t.key]]
            if bad:
                raise ValueError(f"task {t.key!r} runs after {bad}, which are not earlier tasks of this run")
        results: list[TaskResult | None] = [None] * len(tasks)
        todo = set()
        for i, t in enumerate(tasks):   # a task runs when it is not recorded or a task before it runs
            if any(index[a] in todo for a in t.after) or not self._done(t):
                todo.add(i)
                if self.steps is not None:
                    self.steps.forget(t.key)
            else:
                results[i] = TaskResult(t.key, resumed=True)
        self.bar.total += len(tasks)
        self.bar.update(len(tasks) - len(todo))
        self.bar.refresh()
        if todo:
            pending = [i for i in range(len(tasks)) if i in todo]
            if self.s.backend == "ray":
                self._run_ray(tasks, pending, results)
            elif self.s.workers <= 1:
                self._run_here(tasks, pending, results)
            else:
                self._run_pool(tasks, pending, results)
        return results  # type: ignore[return-value]

    def _finish(self, tasks, i, results, value, seconds, attempts) -> None:
        t = tasks[i]
        self._mark(t)
        results[i] = TaskResult(t.key, value, False, seconds, attempts)
        self.bar.update(1)

    def _run_here(self, tasks, pending, results) -> None:
        for i in pending:
            t = tasks[i]
            attempts = 0
            while True:
                attempts += 1
                t0 = time.time()
                try:
                    value = execute(t.fn, t.kwargs, self.s.threads)
                except Exception:   # noqa: BLE001 - retried, then reported with the task's name
                    err = traceback.format_exc()
                    if attempts > self.s.max_retries:
                        raise TaskFailed(t.key, err, attempts) from None
                    self._say(f"task {t.key} failed (attempt {attempts}), retrying:\n{err}")
                    continue
                self._finish(tasks, i, results, value, time.time() - t0, attempts)
                break

    # local worker processes
    def _new_pool(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        devices = None
        if self.s.gpu:
            devices = ctx.Queue()
            for d in range(self.s.workers):
                devices.put(d)
        return ProcessPoolExecutor(max_workers=self.s.workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(self.s.threads, devices))

    def _run_pool(self, tasks, pending, results) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        attempts = {i: 0 for i in pending}
        queue = list(pending)
        running: dict = {}   # future -> (task index, start time)
        failure: TaskFailed | None = None
        if self._pool is None:
            self._pool = self._new_pool()
        while queue or running:
            while failure is None and queue and len(running) < self.s.workers:
                i = next((j for j in queue if self._deps_done(tasks, j, results)), None)
                if i is None:
                    break
                queue.remove(i)
                attempts[i] += 1
                t = tasks[i]
                try:
                    fut = self._pool.submit(execute, t.fn, {k: _pack(v) for k, v in t.kwargs.items()},
                                            self.s.threads)
                except BrokenProcessPool:
                    queue.insert(0, i)
                    attempts[i] -= 1
                    self._restart_pool()
                    continue
                running[fut] = (i, time.time())
            if not running:
                if failure is not None or not queue:
                    break
                raise RuntimeError("grid: tasks wait for tasks that cannot run")   # unreachable: order is checked
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                i, t0 = running.pop(fut)
                try:
                    value = fut.result()
                except BrokenProcessPool:
                    broken = True
                    queue.insert(0, i)   # charged one attempt; resubmitted on the new pool
                    if attempts[i] > self.s.max_retries:
                        failure = failure or TaskFailed(tasks[i].key, "a worker process died while running it",
                                                        attempts[i])
                    continue
                except Exception as exc:   # noqa: BLE001
                    failure = self._retry_or_fail(tasks, i, exc, attempts, queue, failure)
                    continue
                self._finish(tasks, i, results, value, time.time() - t0, attempts[i])
            if broken:
                # every future of a broken pool fails: put the others back too, each charged an attempt
                for fut, (i, _) in list(running.items()):
                    running.pop(fut)
                    queue.insert(0, i)
                    if attempts[i] > self.s.max_retries:
                        failure = failure or TaskFailed(tasks[i].key, "a worker process died while running it",
                                                        attempts[i])
                self._say("a worker process died; restarting the pool and resubmitting its tasks")
                self._restart_pool()
                queue.sort()
        if failure is not None:
            raise failure

    def _retry_or_fail(self, tasks, i, exc, attempts, queue, failure):
        """Task ``i`` raised ``exc``: queue it again, or (retries spent) keep the first failure to raise."""
        err = "".join(traceback.format_exception(exc))
        if attempts[i] > self.s.max_retries:
            return failure or TaskFailed(tasks[i].key, err, attempts[i])
        self._say(f"task {tasks[i].key} failed (attempt {attempts[i]}), retrying:\n{err}")
        queue.insert(0, i)
        return failure

    def _deps_done(self, tasks, i, results) -> bool:
        if not tasks[i].after:
            return True
        pos = {t.key: j for j, t in enumerate(tasks)}
        return all(results[pos[a]] is not None for a in tasks[i].after)

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    # Ray
    def _run_ray(self, tasks, pending, results) -> None:
        from .ray_featurize import ensure_ray

        ray = ensure_ray(self.s.ray_address, num_cpus=max(1, int(self.s.workers * self.s.cpus_per_task)))
        if self._ray_fn is None:
            self._ray_fn = ray.remote(max_retries=0)(execute)
        opts = {"num_gpus": 1, "num_cpus": self.s.cpus_per_task} if self.s.gpu else {"num_cpus": self.s.cpus_per_task}
        attempts = {i: 0 for i in pending}
        queue = list(pending)
        running: dict = {}
        failure: TaskFailed | None = None
        while queue or running:
            for i in [j for j in queue if failure is None and self._deps_done(tasks, j, results)]:
                queue.remove(i)
                attempts[i] += 1
                t = tasks[i]
                ref = self._ray_fn.options(**opts).remote(t.fn, {k: _pack(v) for k, v in t.kwargs.items()},
                                                          self.s.threads)
                running[ref] = (i, time.time())
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            i, t0 = running.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except Exception as exc:   # noqa: BLE001 - a task error or a dead worker
                failure = self._retry_or_fail(tasks, i, exc, attempts, queue, failure)
                continue
            self._finish(tasks, i, results, value, time.time() - t0, attempts[i])
        if failure is not None:
            raise failure


def run_tasks(tasks: Sequence[Task], stage=None, *, desc: str = "tasks", progress: bool = False,
              settings: Settings | None = None, log: Callable[[str], None] | None = None) -> list[TaskResult]:
    """One :meth:`Grid.run` with a grid of its own (a stage with several waves keeps one :class:`Grid`)."""
    with Grid(stage, desc, progress, settings, log) as g:
        return g.run(tasks)
