"""TRAK featurizing sharded over Ray workers (optional extra ``ray``).

The training set is cut into one contiguous shard per worker (cut at multiples of the
batch size, so every worker sees the batches a single process would). Under each
checkpoint every worker computes its shard's projected gradients and out-to-loss weights
(:meth:`attribution.TrakScorer.compute_features`, nothing written on the worker) and
returns them through Ray's object store; the driver writes each shard into traker's store
in the scorer's ``save_dir``, marks those images featurized, and traker's
``finalize_features`` finishes as in a single-process run. The factorized featurizer's
dimension split is made once on the driver and sent to the workers.

A driver holds one checkpoint's shards at a time: ``n_train * proj_dim * 4`` bytes.
"""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np

from . import attribution


def _require_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("featurizing on Ray needs the optional extra: pip install 'd3m-lib[ray]' "
                          "(or pip install ray)") from e
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised once per process: the cluster at ``address`` (parameter ``ray_address``:
    ``"auto"``, ``"ray://head:10001"``), or with None a local Ray of ``num_cpus`` CPUs.

    The one Ray setup of the study: the sharded featurizer and the training grid
    (:mod:`d3m_lib.grid`, ``grid_backend: ray``) both join through it.
    """
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address or num_cpus is None else {"num_cpus": int(num_cpus)}))
    return ray


def shard_bounds(n: int, workers: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` shards, cut at multiples of ``batch_size``, none empty."""
    n_batches = -(-n // batch_size)
    per = np.array_split(np.arange(n_batches), min(workers, n_batches))
    return [(int(b[0]) * batch_size, min(n, (int(b[-1]) + 1) * batch_size)) for b in per if len(b)]


def _shard_features(spec: dict, model_id: int, plan: dict | None, rows: np.ndarray):
    with tempfile.TemporaryDirectory() as tmp:
        sc = attribution.TrakScorer(spec["model_fn"], tmp, spec["images"]() if callable(spec["images"])
                                    else spec["images"], rows, spec["labels"],
                                    {model_id: spec["checkpoints"][model_id]}, _shard=True,
                                    **spec["kwargs"])
        if plan is not None:
            sc._plans[model_id] = plan
        return sc.compute_features(model_id, rows)


def featurize_on_ray(scorer: "attribution.TrakScorer", workers: int = 2, *,
                     open_images: Callable | None = None, address: str | None = None,
                     gpus_per_worker: float = 0, cpus_per_worker: float = 1) -> None:
    """Featurize ``scorer``'s training set on ``workers`` Ray workers, then finalize.

    Args:
        scorer: a writable :class:`attribution.TrakScorer`; its not yet featurized
            checkpoints are done here (resume works as for :meth:`TrakScorer.featurize`).
        open_images: zero-argument callable that opens the image cache on a worker (for
            example ``functools.partial(image_cache.open_cache, cache_dir, px)``); without
            it the scorer's ``images`` are pickled to every worker (small data only).
        address: Ray cluster address (``"auto"`` or ``"ray://head:10001"``); None starts
            or reuses a local Ray.
        gpus_per_worker: GPUs each shard task asks for (1 for one worker per GPU).
    """
    if scorer.read_only:
        raise RuntimeError("featurize_on_ray needs a writable scorer")
    ray = ensure_ray(address, num_cpus=max(1, int(workers * cpus_per_worker)))
    task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_shard_features)
    spec = {"model_fn": scorer.model_fn, "images": open_images or scorer.images,
            "labels": scorer.labels,
            "checkpoints": {m: scorer._state(m) for m in scorer.checkpoints},
            "kwargs": dict(proj_dim=scorer.proj_dim, lambda_reg=scorer.lambda_reg,
                           device="cuda" if gpus_per_worker else scorer.device,
                           projector_seed=scorer.projector_seed, batch_size=scorer.batch_size,
                           transform=scorer.transform, featurizer=scorer.featurizer_kind)}
    spec_ref = ray.put(spec)
    saver = scorer.traker.saver
    bounds = shard_bounds(len(scorer.train_rows), workers, scorer.batch_size)
    for mid in sorted(scorer.checkpoints):
        if saver.model_ids.get(mid, {}).get("is_featurized") == 1:
            continue
        plan = scorer.plan_for(mid)
        scorer.traker.load_checkpoint(scorer._state(mid), model_id=mid)
        done = np.asarray(saver.current_store["is_featurized"]).reshape(-1) == 1
        todo = [(s, e) for s, e in bounds if not done[s:e].all()]
        refs = {task.remote(spec_ref, mid, plan, scorer.train_rows[s:e]): (s, e) for s, e in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            s, e = refs.pop(ready[0])
            g, q = ray.get(ready[0])
            saver.current_store["grads"][s:e] = g
            saver.current_store["out_to_loss"][s:e] = q.reshape(-1, 1)
            saver.current_store["is_featurized"][s:e] = 1
            for k in ("grads", "out_to_loss", "is_featurized"):
                saver.current_store[k].flush()
            saver.serialize_current_model_id_metadata()
    scorer.finalize()
