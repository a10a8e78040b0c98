"""The training grid (d3m_lib.grid): identical results for 1 and 2 workers (local and Ray), resume,
retries that stop naming the task, a killed worker recovered, and stage 05's k rule."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d3m_lib import config, grid
from d3m_lib.grid import Grid, Settings, Task, TaskFailed
from d3m_lib.rundir import RunDir

FINDING = "Cardiomegaly"
PX = 16


# -- task functions: imported by name in the workers ------------------------------------------------
def square(x: int, out: str | None = None, sleep: float = 0.0) -> int:
    time.sleep(sleep)
    if out:
        Path(out).write_text(str(x * x))
    return x * x


def fail_first(marker: str, x: int) -> int:
    """Raises on its first call (a marker file remembers it), then succeeds."""
    if not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise ValueError(f"first attempt of {x} fails on purpose")
    return x


def always_fails(x: int) -> int:
    raise ValueError(f"task {x} cannot succeed")


def pid_then_sleep(pidfile: str, x: int) -> int:
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(1.5)
    return x


def threads_seen() -> int:
    import torch

    return torch.get_num_threads()


def _grid(workers: int, backend: str = "local", retries: int = 1, stage=None) -> Grid:
    return Grid(stage, "test", settings=Settings(workers=workers, backend=backend, threads=1, max_retries=retries))


# -- the executor ------------------------------------------------------------------------------------
def test_settings_from_the_configuration(monkeypatch):
    monkeypatch.setattr(grid, "_cpus", lambda: 2)
    s = Settings.from_config(config.resolve({"device": "cpu"}))
    assert (s.workers, s.threads, s.backend, s.max_retries) == (2, 1, "local", 1)   # this machine: 2 x 1
    s = Settings.from_config(config.resolve({"device": "cpu", "grid_threads_per_worker": 2}))
    assert (s.workers, s.threads) == (1, 2)
    s = Settings.from_config(config.resolve({"device": "cpu", "grid_workers": 3, "grid_backend": "ray",
                                             "ray_address": "auto", "max_retries": 0}))
    assert (s.workers, s.threads, s.backend, s.ray_address, s.max_retries) == (3, 1, "ray", "auto", 0)



@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_submission_order_with_the_thread_count(workers, tmp_path):
    tasks = [Task(f"t{i}", "test_grid:square", dict(x=i, sleep=0.2 if i == 0 else 0.0)) for i in range(5)]
    with _grid(workers) as g:
        res = g.run(tasks)
        assert [r.value for r in res] == [0, 1, 4, 9, 16] and [r.key for r in res] == [t.key for t in tasks]
        assert g.run([Task("threads", "test_grid:threads_seen")])[0].value == 1


def test_an_np_memmap_travels_by_file_name(tmp_path):
    f = tmp_path / "a.u8"
    np.arange(24, dtype=np.uint8).tofile(f)
    mm = np.memmap(f, dtype=np.uint8, mode="r", shape=(2, 3, 4))[:1]
    ref = grid._pack(mm)
    assert isinstance(ref, grid.MemmapRef) and np.array_equal(ref.open(), mm)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_task_is_retried_once_then_the_grid_stops_naming_it(workers, tmp_path):
    with _grid(workers) as g:
        assert g.run([Task("flaky", "test_grid:fail_first", dict(marker=str(tmp_path / "m"), x=3))])[0].value == 3
        with pytest.raises(TaskFailed, match="'bad'.*failed 2 time.*task 7 cannot succeed") as err:
            g.run([Task("ok", "test_grid:square", dict(x=2)), Task("bad", "test_grid:always_fails", dict(x=7))])
    assert err.value.key == "bad" and err.value.attempts == 2


def test_a_killed_worker_is_replaced_and_its_task_run_again(tmp_path):
    pidfile = tmp_path / "pid"

    def kill_once():
        for _ in range(2400):   # spawned workers import torch first: allow them time to start
            if pidfile.exists() and pidfile.read_text():
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once)
    with _grid(2) as g:
        killer.start()
        res = g.run([Task("victim", "test_grid:pid_then_sleep", dict(pidfile=str(pidfile), x=5)),
                     *[Task(f"t{i}", "test_grid:square", dict(x=i)) for i in range(3)]])
        killer.join()
    assert [r.value for r in res] == [5, 0, 1, 4] and res[0].attempts == 2


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'd3m-lib[ray]')")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")   # a busy 2-core machine starts Ray slowly
    before = os.environ.get("PYTHONPATH")
    tests = str(Path(__file__).parent)   # local Ray workers inherit it: they import this module's tasks by name
    os.environ["PYTHONPATH"] = os.pathsep.join([tests, before]) if before else tests
    try:
        for attempt in (1, 2):   # under heavy load Ray's node can time out while starting: try once more
            try:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def test_ray_backend_retries_and_keeps_order(ray_session, tmp_path):
    with _grid(2, "ray") as g:
        res = g.run([Task(f"t{i}", "test_grid:square", dict(x=i)) for i in range(4)]
                    + [Task("flaky", "test_grid:fail_first", dict(marker=str(tmp_path / "m"), x=9))])
        assert [r.value for r in res] == [0, 1, 4, 9, 9] and res[-1].attempts == 2
        with pytest.raises(TaskFailed, match="'bad'"):
            g.run([Task("bad", "test_grid:always_fails", dict(x=1))])


def test_an_interrupted_grid_resumes_only_unfinished_tasks(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = config.resolve({})
    run.write_config(cfg)
    stage = run.begin("01_cohort", cfg)
    outs = [tmp_path / f"o{i}.txt" for i in range(4)]
    tasks = [Task(f"t{i}", "test_grid:square", dict(x=i, out=str(outs[i])), signature={"x": i}, files=(outs[i],))
             for i in range(3)] + [Task("bad", "test_grid:always_fails", dict(x=3))]
    with pytest.raises(TaskFailed):
        with _grid(1, retries=0, stage=stage) as g:
            g.run(tasks)
    assert all(stage.steps().done(f"t{i}", {"x": i}, files=(outs[i],)) for i in range(3))
    mtimes = [outs[i].stat().st_mtime_ns for i in range(3)]
    outs[1].unlink()   # a recorded task whose output is gone runs again
    fixed = tasks[:3] + [Task("t3", "test_grid:square", dict(x=3, out=str(outs[3])), files=(outs[3],),
                              after=("t1",))]
    with _grid(2, stage=stage) as g:
        res = g.run(fixed)
    assert [r.resumed for r in res] == [True, False, True, False]   # t3 runs after t1, which ran
    assert outs[0].stat().st_mtime_ns == mtimes[0] and outs[2].stat().st_mtime_ns == mtimes[2]
    assert res[3].value == 9


# -- stages 03-05 with 1 and 2 workers, local and Ray: the same files ---------------------------------------
def _prepared(root: Path):
    """Stages 01 and 02 of a tiny fake cohort (written directly)."""
    from test_analysis import write_tiny_run_to_02

    return write_tiny_run_to_02(root, {"image_size": PX, "width": 4, "batch_size": 32, "seeds": [0, 1],
                                       "epochs_anchor": 1, "epochs_more": 1, "device": "cpu", "min_group_n": 3,
                                       "trak_models": 0, "trak_checkpoints": [1], "trak_proj_dim": 16,
                                       "trak_batch_size": 64,
                                       "d3m_k_grid": [0.05, 0.15], "random_draws": 2, "n_boot": 20,
                                       "findings": [FINDING]}, FINDING, PX)


def _stages_03_to_05(run: RunDir, cfg) -> None:
    from d3m_lib.stages import baseline, d3m, trak

    for name, mod in (("03_baseline", baseline), ("04_trak", trak), ("05_d3m", d3m)):
        mod.run(run.begin(name, cfg))


def _artifacts(run: RunDir) -> dict[str, bytes]:
    """Every file of stages 03-05 but the manifests (times), with the run folder's own path (which
    traker's json files hold) replaced by a placeholder."""
    out = {}
    for stage in ("03_baseline", "04_trak", "05_d3m"):
        for f in sorted(run.stage_dir(stage).rglob("*")):
            if f.is_file() and f.name != "manifest.json":
                out[str(f.relative_to(run.path))] = f.read_bytes().replace(str(run.path).encode(), b"<run>")
    return out


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid_runs")
    run, cfg = _prepared(root)
    shutil.copytree(run.path, root / "pristine")
    _stages_03_to_05(run, cfg.with_overrides({"grid_workers": 1}))
    return root, cfg, _artifacts(run)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} of {len(a)} files differ, e.g. {differ[:5]}"


def test_two_local_workers_write_byte_identical_artifacts(one_worker):
    root, cfg, first = one_worker
    run = RunDir(shutil.copytree(root / "pristine", root / "two_local"))
    _stages_03_to_05(run, cfg.with_overrides({"grid_workers": 2}))
    _same(first, _artifacts(run))
    assert run.manifest("05_d3m")["summary"]["random_draws"] == 2


def test_two_ray_workers_write_byte_identical_artifacts(one_worker, ray_session):
    root, cfg, first = one_worker
    run = RunDir(shutil.copytree(root / "pristine", root / "two_ray"))
    _stages_03_to_05(run, cfg.with_overrides({"grid_workers": 2, "grid_backend": "ray"}))
    _same(first, _artifacts(run))


# -- stage 05's k: the mean over every seed, ties to the smaller k ----------------------------------------
def test_k_is_chosen_on_the_mean_over_all_seeds_with_ties_to_the_smaller_k():
    from d3m_lib.stages.d3m import choose_k

    def curve(rows):
        return pd.DataFrame([dict(method="d3m", split="validate", seed=s, k=k, wga=w) for s, k, w in rows]
                            + [dict(method="d3m", split="test", seed=0, k=5, wga=1.0)])

    # seed 0 alone would pick k=10; the mean over both seeds picks k=20
    k, v = choose_k(curve([(0, 10, 0.9), (1, 10, 0.5), (0, 20, 0.8), (1, 20, 0.8), (0, 0, 1.0), (1, 0, 1.0)]), "d3m")
    assert (k, v) == (20, pytest.approx(0.8))
    # equal means: the smaller k
    k, _ = choose_k(curve([(0, 30, 0.7), (1, 30, 0.7), (0, 10, 0.6), (1, 10, 0.8), (0, 20, 0.5), (1, 20, 0.5)]),
                    "d3m")
    assert k == 10
