"""TRAK attribution scores via ``traker``: featurize over checkpoints, group-mean scores.

TRAK (Park et al., 2023) scores how much training image ``i`` moves the margin of
target image ``z``. ``traker`` computes, for checkpoints ``c = 1..C`` with projected
training gradients ``X_c`` (``n_train x p``) and projected target gradients ``g_c(z)``::

    T[i, z] = (1/C) sum_c [X_c (X_c^T X_c + lambda I)^-1]_i . g_c(z)   *   (1/C) sum_c Q_c[i]

(``trak.TRAKer.finalize_scores``; ``Q_c[i]`` is the out-to-loss gradient of training
image ``i`` under checkpoint ``c``). Every target is scored with *its own checkpoint's*
gradient ``g_c(z)``; the score is linear in ``g_c(z)``, so the mean of ``T[i, z]`` over
the validation images of a group equals the score of one target whose gradient under
each checkpoint is the group mean of ``g_c(z)``. :meth:`TrakScorer.group_scores` uses this
to get ``tau(g)_i`` without an ``n_train x n_val`` matrix.

The parts follow traker's design: the model output (:class:`BinaryLogitOutput`), the
projector (:func:`make_projector`), traker's memory-mapped saver (so an interrupted run
resumes: traker records which models and which training images are featurized) and
traker's score computer.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm
from trak import TRAKer
from trak.gradient_computers import AbstractGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, BasicProjector, ProjectionType
from trak.score_computers import BasicScoreComputer

from .featurize import CALIBRATION_IMAGES, FactorizedFeaturizer

CONFIG = "scorer.json"
FEATURIZER_STATE = "featurizer.json"  # the factorized featurizer's dimension split per checkpoint
FEATURIZERS = ("factorized", "traker")
_PROJ_MATRIX_BUDGET_BYTES = 1 << 30  # BasicProjector keeps <= 1 GiB of projection matrix
_fast_jl_warned = False


@contextlib.contextmanager
def _quiet_traker_bars():
    """traker's own bars (one step per checkpoint, instant) go to a discarded stream."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


class BinaryLogitOutput(AbstractModelOutput):
    """TRAK model output for a single-logit binary classifier trained with BCE.

    Margin ``f(z) = (2y - 1) * logit``; the BCE loss is ``log(1 + exp(-f))``, so the
    out-to-loss weight traker multiplies in is ``-dloss/df = sigmoid(-f)`` (= 1 - p of the
    true class; the analogue of traker's ``1 - p`` for softmax classifiers).
    """

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def get_output(model, weights, buffers, image, label):
        logit = torch.func.functional_call(model, (weights, buffers), image.unsqueeze(0))
        return ((2.0 * label - 1.0) * logit.reshape(())).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        images, labels = batch
        logits = torch.func.functional_call(model, (weights, buffers), images).reshape(-1)
        margins = (2.0 * labels.reshape(-1) - 1.0) * logits
        return torch.sigmoid(-margins).clone().detach().unsqueeze(-1)


class _BasicProjector(BasicProjector):
    """traker's BasicProjector, re-creating its matrix after ``free_memory``.

    traker 0.3.2 frees the matrix in ``finalize_features``; with a single block and an
    unchanged model id ``project`` would then use the deleted matrix.
    """

    def project(self, grads, model_id):
        if not self.proj_matrix_available and self.num_blocks == 1 and model_id == self.model_id:
            self.generate_sketch_matrix(self.generator_states[0])
        return super().project(grads, model_id)


class _PassThroughProjector(AbstractProjector):
    """traker projector for features that arrive projected (the factorized featurizer).

    Its ``proj_type`` is recorded in traker's ``metadata.json``; traker refuses to mix
    features of another projection type in the same folder.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device):
        super().__init__(grad_dim, proj_dim, seed, "factorized_kronecker_normal", device)

    def project(self, grads, model_id):
        if grads.shape[-1] != self.proj_dim:
            raise ValueError(f"expected {self.proj_dim} projected features, got {grads.shape[-1]}")
        return grads

    def free_memory(self):
        pass


class _FactorizedGradientComputer(AbstractGradientComputer):
    """traker gradient computer that returns :class:`FactorizedFeaturizer` features.

    traker then divides by ``sqrt(#params)`` and stores them, exactly as its own
    projected gradients; the out-to-loss weights reuse the featurizing pass's margins.
    """

    def __init__(self, model, task, grad_dim, dtype, device, grad_wrt=None, *,
                 featurizer: FactorizedFeaturizer):
        super().__init__(model, task, grad_dim, dtype, device)
        if grad_wrt is not None:
            raise ValueError("the factorized featurizer covers all parameters (grad_wrt unsupported)")
        self.featurizer = featurizer

    def load_model_params(self, model) -> None:
        pass  # the featurizer hooks the same module object traker loads weights into

    def compute_per_sample_grad(self, batch):
        return self.featurizer.features(batch[0], batch[1])

    def compute_loss_grad(self, batch):
        m = self.featurizer.last_margins(batch[0])
        if m is None:
            self.featurizer.features(batch[0], batch[1])
            m = self.featurizer.last_margins(batch[0])
        return torch.sigmoid(-m).detach().unsqueeze(-1)


class _Fp64ScoreComputer(BasicScoreComputer):
    """traker's score computer with ``X^T X`` accumulated and inverted in float64.

    Half-precision ``X^T X`` overflows at 65,504 (about 50k training images); float32
    blocks lose digits over 10^5 rows. Keeps traker's rescaling of the inverse by its
    mean absolute value (a per-checkpoint constant), so scores equal traker's.
    """

    def get_xtx(self, grads):
        self.proj_dim = grads.shape[1]
        result = torch.zeros(self.proj_dim, self.proj_dim, dtype=torch.float64, device=self.device)
        for block in torch.split(grads, self.CUDA_MAX_DIM_SIZE, dim=0):
            b = block.to(self.device, torch.float64)
            result += b.T @ b
        return result

    def get_x_xtx_inv(self, grads, xtx):
        reg = xtx.double() + self.lambda_reg * torch.eye(xtx.shape[0], dtype=torch.float64,
                                                         device=xtx.device)
        inv = torch.linalg.inv(reg)
        inv /= inv.abs().mean()
        result = torch.empty(grads.shape[0], inv.shape[1], dtype=self.dtype, device=self.device)
        for s in range(0, grads.shape[0], self.CUDA_MAX_DIM_SIZE):
            b = grads[s:s + self.CUDA_MAX_DIM_SIZE].to(self.device, torch.float64)
            result[s:s + len(b)] = (b @ inv).to(self.dtype)
        return result


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_projector(model: torch.nn.Module, proj_dim: int, seed: int, device: str):
    """The JL projector: traker's CUDA projector when ``fast_jl`` works, else BasicProjector.

    Returns ``None`` on CUDA with ``fast_jl`` importable (traker then builds its own
    ``CudaProjector``/``ChunkedCudaProjector``). Otherwise a ``BasicProjector`` (Gaussian
    on CPU, Rademacher on GPU) whose matrix blocks are as large as 1 GiB allows, so a
    small model keeps one block in memory instead of regenerating it every batch.
    """
    global _fast_jl_warned
    grad_dim = _count_params(model)
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        try:
            import fast_jl  # noqa: F401
            return None
        except ImportError:
            if not _fast_jl_warned:
                print("fast_jl is not installed: TRAK uses traker's BasicProjector on the GPU "
                      "(slower; `pip install traker[fast]` to get the CUDA projector)")
                _fast_jl_warned = True
    block = max(1, min(proj_dim, _PROJ_MATRIX_BUDGET_BYTES // (4 * grad_dim)))
    return _BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed,
                          proj_type=ProjectionType.rademacher if on_cuda else ProjectionType.normal,
                          device=device, block_size=block, dtype=torch.float32)


def default_transform(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, px, px)`` -> float ``(B, 1, px, px)`` in [0, 1] (for models trained so)."""
    return torch.as_tensor(np.asarray(images_u8), dtype=torch.float32).unsqueeze(1) / 255.0


class TrakScorer:
    """TRAK over several checkpoints of one model, for one training set.

    Args:
        model_fn: builds the (untrained) model; checkpoints are its state_dicts.
        save_dir: traker's save_dir (features, target gradients, scores, metadata).
        images: indexable by cache row -> uint8 ``(px, px)`` images (the image cache).
        train_rows: cache rows of the training images, in training-index order.
        labels: 0/1 label per cache row (a Series indexed by row) for train and targets.
        checkpoints: model_id -> checkpoint path (or state_dict); model ids are ints.
        proj_dim: JL dimension; must be below the number of training images.
        lambda_reg: ridge term added to ``X^T X`` (traker's ``lambda_reg``).
        transform: uint8 batch -> model input tensor (must match training;
            notebooks use ``training.to_tensor``).
        featurizer: ``"factorized"`` (:mod:`d3m_lib.featurize`: per-layer Kronecker
            projections, no per-example gradients) or ``"traker"`` (traker's per-example
            gradients and dense JL projection). Parameter ``trak_featurizer``.
        read_only: never write into ``save_dir`` (the features must be finalized there);
            targets are scored in memory and traker's scratch files go to ``scratch_dir``
            (a new temporary folder if None).
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], save_dir: str | Path,
                 images, train_rows: Sequence[int], labels: pd.Series,
                 checkpoints: Mapping[int, Any], *, proj_dim: int = 256,
                 lambda_reg: float = 0.0, device: str = "cpu", projector_seed: int = 0,
                 batch_size: int = 64, transform: Callable | None = None,
                 featurizer: str = "factorized", read_only: bool = False,
                 scratch_dir: str | Path | None = None, logging_level: int = logging.WARNING,
                 _shard: bool = False):
        if featurizer not in FEATURIZERS:
            raise ValueError(f"trak_featurizer={featurizer!r}; expected one of {FEATURIZERS}")
        self.model_fn = model_fn
        self.save_dir = Path(save_dir)
        self.images = images
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        self.labels = labels
        self.checkpoints = {int(k): v for k, v in checkpoints.items()}
        if not self.checkpoints:
            raise ValueError("TrakScorer needs at least one checkpoint (trak_checkpoints is empty)")
        self.proj_dim = int(proj_dim)
        if not 0 < self.proj_dim < len(self.train_rows) and not _shard:
            raise ValueError(f"trak_proj_dim={proj_dim} must be positive and below the number "
                             f"of training images ({len(self.train_rows)})")
        self.lambda_reg = float(lambda_reg)
        self.device = device
        self.batch_size = int(batch_size)
        self.transform = transform or default_transform
        self.featurizer_kind = featurizer
        self.projector_seed = int(projector_seed)
        self.read_only = bool(read_only)
        self.model = model_fn().to(device).eval()
        if self.read_only:
            if not (self.save_dir / "metadata.json").exists():
                raise FileNotFoundError(f"{self.save_dir} holds no TRAK features to read")
            traker_dir = Path(scratch_dir) if scratch_dir else Path(tempfile.mkdtemp(prefix="trak_"))
        else:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            traker_dir = self.save_dir
        self._plans: dict[int, dict] = {}
        if featurizer == "factorized":
            self.featurizer = FactorizedFeaturizer(self.model, self.proj_dim, self.projector_seed)
            gc = functools.partial(_FactorizedGradientComputer, featurizer=self.featurizer)
            projector = _PassThroughProjector(_count_params(self.model), self.proj_dim,
                                              self.projector_seed, device)
            f = self.save_dir / FEATURIZER_STATE
            if f.exists():
                self._plans = {int(k): v for k, v in json.loads(f.read_text())["plans"].items()}
        else:
            self.featurizer = None
            from trak.gradient_computers import FunctionalGradientComputer as gc
            projector = make_projector(self.model, self.proj_dim, projector_seed, device)
        self.traker = TRAKer(
            model=self.model, task=BinaryLogitOutput(), train_set_size=len(self.train_rows),
            save_dir=str(traker_dir), load_from_save_dir=True, device=device,
            gradient_computer=gc, projector=projector, score_computer=_Fp64ScoreComputer,
            proj_dim=self.proj_dim, use_half_precision=False, projector_seed=projector_seed,
            lambda_reg=self.lambda_reg, logging_level=logging_level)

    # -- helpers -----------------------------------------------------------
    def _state(self, model_id: int) -> dict:
        ck = self.checkpoints[model_id]
        if isinstance(ck, Mapping):
            return dict(ck)
        return torch.load(ck, map_location=self.device, weights_only=True)

    def _label(self, rows: np.ndarray) -> np.ndarray:
        missing = np.setdiff1d(rows, self.labels.index.to_numpy())
        if len(missing):
            raise KeyError(f"no label for cache rows {missing[:5].tolist()} (of {len(missing)})")
        y = np.array(self.labels.loc[rows], dtype=np.float64)
        if np.isnan(y).any() or not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("TRAK targets need labels 0/1; got NaN or other values")
        return y

    def _batches(self, rows: np.ndarray):
        y = self._label(rows)
        for s in range(0, len(rows), self.batch_size):
            sl = slice(s, min(s + self.batch_size, len(rows)))
            x = self.transform(np.stack([self.images[int(r)] for r in rows[sl]])).to(self.device)
            yield np.arange(sl.start, sl.stop), [x, torch.as_tensor(y[sl], dtype=torch.float32,
                                                                    device=self.device)]

    def _fresh_experiment(self, exp_name: str) -> None:
        """Remove an earlier experiment of this name (target sets may differ in size)."""
        for mid in self.checkpoints:
            f = self.save_dir / str(mid) / f"{exp_name}_grads.mmap"
            f.unlink(missing_ok=True)
        (self.save_dir / "scores" / f"{exp_name}.mmap").unlink(missing_ok=True)

    def plan_for(self, model_id: int) -> dict | None:
        """The factorized featurizer's dimension split under one checkpoint (None for traker).

        Made once from the exact gradients of the first ``CALIBRATION_IMAGES`` training
        images and kept in ``featurizer.json``, so that resumed runs, targets and Ray
        workers project identically.
        """
        if self.featurizer is None:
            return None
        if model_id not in self._plans:
            if self.read_only:
                raise FileNotFoundError(f"{self.save_dir / FEATURIZER_STATE} has no featurizer plan "
                                        f"for checkpoint {model_id}")
            self.model.load_state_dict(self._state(model_id))
            _, (x, y) = next(self._batches(self.train_rows[:CALIBRATION_IMAGES]))
            self._plans[model_id] = self.featurizer.plan(self.featurizer.energies(x, y))
            f = self.save_dir / FEATURIZER_STATE
            f.write_text(json.dumps({"kind": "factorized", "plans": {
                str(k): v for k, v in sorted(self._plans.items())}}, indent=1))
        return self._plans[model_id]

    def _use_checkpoint(self, model_id: int) -> dict:
        """Load one checkpoint into the model (and its featurizer plan); returns its state."""
        state = self._state(model_id)
        plan = self.plan_for(model_id)
        if plan is not None:
            self.featurizer.set_plan(plan)
        self.model.load_state_dict(state)
        self.model.eval()
        self.traker.gradient_computer.load_model_params(self.model)
        return state

    def compute_features(self, model_id: int, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Projected gradients ``(n, p)`` and out-to-loss weights ``(n,)`` of cache rows, in memory.

        The same operations as ``TRAKer.featurize`` (project, divide by ``sqrt(#params)``),
        without writing anything: used for read-only scoring and by Ray workers.
        """
        self._use_checkpoint(model_id)
        rows = np.asarray(rows, dtype=np.int64)
        g = np.zeros((len(rows), self.proj_dim), dtype=np.float32)
        q = np.zeros(len(rows), dtype=np.float32)
        t, gc = self.traker, self.traker.gradient_computer
        for inds, batch in self._batches(rows):
            grads = t.projector.project(gc.compute_per_sample_grad(batch=batch), model_id=model_id)
            grads /= t.normalize_factor
            g[inds] = grads.to(torch.float32).cpu().numpy()
            q[inds] = gc.compute_loss_grad(batch).reshape(-1).float().cpu().numpy()
        return g, q

    # -- featurizing -------------------------------------------------------
    def featurize(self) -> None:
        """Project training gradients under every checkpoint; resumes where it stopped."""
        if self.read_only:
            if not all(self.is_finalized(m) for m in self.checkpoints):
                raise RuntimeError(f"{self.save_dir} is read-only here and not fully featurized")
            return
        ids = self.traker.saver.model_ids
        for mid in sorted(self.checkpoints):
            if ids.get(mid, {}).get("is_featurized") == 1:
                continue
            plan = self.plan_for(mid)
            self.traker.load_checkpoint(self._state(mid), model_id=mid)
            if plan is not None:
                self.featurizer.set_plan(plan)
            n_batches = -(-len(self.train_rows) // self.batch_size)
            for inds, batch in tqdm(self._batches(self.train_rows), total=n_batches, leave=False,
                                    desc=f"TRAK featurize checkpoint {mid}"):
                self.traker.featurize(batch=batch, inds=inds)
        self.finalize()

    def finalize(self) -> None:
        """traker's ``finalize_features`` for every featurized, not yet finalized checkpoint."""
        ids = self.traker.saver.model_ids
        todo = [m for m in sorted(self.checkpoints) if ids[m].get("is_finalized") != 1]
        if todo:
            with _quiet_traker_bars():
                self.traker.finalize_features(model_ids=todo)

    def is_finalized(self, model_id: int) -> bool:
        f = self.save_dir / f"id_{model_id}.json"
        return f.exists() and json.loads(f.read_text()).get(str(model_id), {}).get("is_finalized") == 1

    def _stored(self, model_id: int, name: str) -> np.ndarray:
        """A traker store array of ``save_dir``, opened read-only."""
        f = self.save_dir / str(model_id) / f"{name}.mmap"
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist")
        return np.load(f, mmap_mode="r")

    def out_to_loss(self, model_id: int) -> np.ndarray:
        """Out-to-loss weights Q of the training images under one checkpoint."""
        return np.array(self._stored(model_id, "out_to_loss")).reshape(-1)

    def features(self, model_id: int) -> np.ndarray:
        """traker's finalized features ``X (X^T X + lambda I)^-1`` (rescaled) of one checkpoint."""
        return np.array(self._stored(model_id, "features"))

    # -- scoring -----------------------------------------------------------
    def _combine(self, target_grads: Mapping[int, np.ndarray], block_rows: int = 65536) -> np.ndarray:
        """traker's ``finalize_scores``: ``mean_c(Phi_c g_c^T) * mean_c(Q_c)``, float64, in row blocks."""
        mids = sorted(self.checkpoints)
        tg = {m: np.asarray(target_grads[m], np.float64) for m in mids}
        n = len(self.train_rows)
        out = np.zeros((n, tg[mids[0]].shape[0]))
        for s in range(0, n, block_rows):
            e = min(n, s + block_rows)
            acc = sum(self._stored(m, "features")[s:e].astype(np.float64) @ tg[m].T for m in mids)
            q = sum(self._stored(m, "out_to_loss")[s:e].astype(np.float64).reshape(-1, 1) for m in mids)
            out[s:e] = (acc / len(mids)) * (q / len(mids))
        return out

    def _target_grads(self, exp_name: str, target_rows: np.ndarray) -> None:
        """Store each checkpoint's own projected target gradients for experiment exp_name."""
        self.featurize()
        self._fresh_experiment(exp_name)
        for mid in sorted(self.checkpoints):
            state = self._use_checkpoint(mid)
            self.traker.start_scoring_checkpoint(exp_name, state, model_id=mid,
                                                 num_targets=len(target_rows))
            for inds, batch in self._batches(target_rows):
                self.traker.score(batch=batch, inds=inds)
            self.traker.saver.current_store[f"{exp_name}_grads"].flush()

    def _finalize(self, exp_name: str) -> np.ndarray:
        with _quiet_traker_bars():
            s = self.traker.finalize_scores(exp_name=exp_name, model_ids=sorted(self.checkpoints))
        return np.array(s, dtype=np.float64)

    def scores(self, target_rows: Sequence[int], exp_name: str = "targets") -> np.ndarray:
        """TRAK scores ``n_train x n_targets`` of the given target cache rows."""
        rows = np.asarray(target_rows, dtype=np.int64)
        if self.read_only:
            return self._combine({m: self.compute_features(m, rows)[0] for m in self.checkpoints})
        self._target_grads(exp_name, rows)
        return self._finalize(exp_name)

    def group_target_grads(self, target_rows: Sequence[int], groups: Sequence[str]
                           ) -> tuple[list[str], dict[int, np.ndarray]]:
        """Group names and, per checkpoint, the group means of the projected target gradients."""
        rows = np.asarray(target_rows, dtype=np.int64)
        groups = np.asarray(groups, dtype=object)
        if len(groups) != len(rows):
            raise ValueError(f"{len(rows)} target rows but {len(groups)} group labels")
        names = sorted(pd.unique(groups).tolist())
        out = {}
        for mid in sorted(self.checkpoints):
            g = self.target_grads(mid, rows).astype(np.float64)
            out[mid] = np.stack([g[groups == n].mean(axis=0) for n in names])
        return names, out

    def target_grads(self, model_id: int, rows: np.ndarray, exp_name: str | None = None) -> np.ndarray:
        """Projected target gradients under one checkpoint: stored ones of ``exp_name`` if given."""
        if exp_name is not None:
            return np.array(self._stored(model_id, f"{exp_name}_grads"))
        return self.compute_features(model_id, rows)[0]

    def group_scores(self, target_rows: Sequence[int], groups: Sequence[str],
                     exp_name: str = "validate") -> pd.DataFrame:
        """``tau(g)_i``: mean TRAK score over the targets of each group (train row x group).

        Scores one target per group whose gradient under checkpoint ``c`` is the group
        mean of the targets' gradients under ``c`` (exact: scores are linear in it). The
        per-image target gradients stay under ``exp_name`` for :meth:`experiment_scores`
        (not in read-only mode, which writes nothing).
        """
        rows = np.asarray(target_rows, dtype=np.int64)
        groups = np.asarray(groups, dtype=object)
        if len(groups) != len(rows):
            raise ValueError(f"{len(rows)} target rows but {len(groups)} group labels")
        names = sorted(pd.unique(groups).tolist())
        if self.read_only:
            _, means = self.group_target_grads(rows, groups)
            tau = self._combine(means)
        else:
            self._target_grads(exp_name, rows)
            means = {}
            for mid in sorted(self.checkpoints):
                g = self.target_grads(mid, rows, exp_name).astype(np.float64)
                means[mid] = np.stack([g[groups == n].mean(axis=0) for n in names])
            tau = self._combine(means)
        return pd.DataFrame(tau, index=pd.Index(self.train_rows, name="row"), columns=names)

    def experiment_scores(self, exp_name: str, num_targets: int) -> np.ndarray:
        """Scores ``n_train x num_targets`` from target gradients stored by an earlier call.

        Reads only (works on a read-only scorer).
        """
        for mid in sorted(self.checkpoints):
            if not (self.save_dir / str(mid) / f"{exp_name}_grads.mmap").exists():
                raise FileNotFoundError(f"no target gradients '{exp_name}' for checkpoint {mid} "
                                        f"in {self.save_dir}; score the targets first")
        exps = json.loads((self.save_dir / "experiments.json").read_text())
        stored = exps.get(exp_name, {}).get("num_targets")
        if stored != num_targets:
            raise ValueError(f"experiment '{exp_name}' in {self.save_dir} has {stored} targets, "
                             f"not {num_targets}")
        return self._combine({m: self._stored(m, f"{exp_name}_grads") for m in self.checkpoints})

    def score_factors(self, exp_name: str | None = None, target_rows: Sequence[int] | None = None,
                      block_rows: int = 65536):
        """The scores as ``S = M G^T`` without forming ``S`` (for :func:`d3m.auto_d3m_per_class`).

        ``G`` (``n_targets x C p``): per-checkpoint target gradients side by side (stored
        ones of ``exp_name``, or computed for ``target_rows``). ``M`` comes as a generator
        of row blocks ``(start, block)`` of ``diag(mean_c Q_c) [Phi_1 ... Phi_C] / C``.
        """
        mids = sorted(self.checkpoints)
        G = np.concatenate([self.target_grads(m, np.asarray(target_rows if target_rows is not None
                                                            else [], np.int64), exp_name)
                            for m in mids], axis=1).astype(np.float64)
        n = len(self.train_rows)

        def blocks():
            for s in range(0, n, block_rows):
                e = min(n, s + block_rows)
                q = sum(self._stored(m, "out_to_loss")[s:e].astype(np.float64).reshape(-1, 1) for m in mids)
                phi = np.concatenate([self._stored(m, "features")[s:e] for m in mids], axis=1)
                yield s, phi.astype(np.float64) * (q / len(mids)) / len(mids)
        return blocks, G

    # -- saving ------------------------------------------------------------
    def save_config(self, **extra) -> None:
        """Write what :func:`load_scorer` needs (``scorer.json``, ``train_rows.npy``).

        Refuses to overwrite features of a different training set in the same folder.
        """
        if self.read_only:
            raise RuntimeError(f"read-only scorer: will not write into {self.save_dir}")
        cfg = dict(proj_dim=self.proj_dim, lambda_reg=self.lambda_reg,
                   batch_size=self.batch_size, featurizer=self.featurizer_kind,
                   projector_seed=int(self.traker.proj_seed),
                   checkpoints={str(k): str(v) for k, v in self.checkpoints.items()}, **extra)
        if (self.save_dir / "train_rows.npy").exists():
            old = np.load(self.save_dir / "train_rows.npy")
            if not np.array_equal(old, self.train_rows):
                raise RuntimeError(f"{self.save_dir} holds TRAK features of other training rows; "
                                   "delete it or re-run the stage")
        np.save(self.save_dir / "train_rows.npy", self.train_rows)
        (self.save_dir / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


def self_influence_rank(scorer: TrakScorer, rows: Sequence[int]) -> pd.DataFrame:
    """For training images used as their own targets: rank of their self-score (1 = top).

    A working attribution ranks a training image near the top of its own score list.
    """
    rows = np.asarray(rows, dtype=np.int64)
    pos = pd.Series(np.arange(len(scorer.train_rows)), index=scorer.train_rows)
    missing = np.setdiff1d(rows, scorer.train_rows)
    if len(missing):
        raise ValueError(f"self-influence needs training rows; {missing[:5].tolist()} are not")
    s = scorer.scores(rows, exp_name="self")
    idx = pos.loc[rows].to_numpy()
    own = s[idx, np.arange(len(rows))]
    rank = (s > own[None, :]).sum(axis=0) + 1
    return pd.DataFrame({"row": rows, "self_score": own, "rank": rank,
                         "percentile": 100.0 * rank / len(scorer.train_rows)})


def top_train_rows(scores: np.ndarray, train_rows: Sequence[int], k: int = 8,
                   most_negative: bool = False) -> np.ndarray:
    """Cache rows of the ``k`` highest (or lowest) scoring training images per target column."""
    order = np.argsort(scores, axis=0)
    pick = order[:k] if most_negative else order[::-1][:k]
    return np.asarray(train_rows)[pick].T


def baseline_scorer(run_path: str | Path, finding: str, seed: int, cohort: pd.DataFrame, images,
                    cfg, checkpoints: Sequence[int], *, proj_dim: int, lambda_reg: float,
                    batch_size: int, projector_seed: int, device: str = "cpu",
                    featurizer: str = "factorized", read_only: bool = False,
                    scratch_dir: str | Path | None = None, ensemble: Sequence[str | Path] | None = None
                    ) -> TrakScorer:
    """The TRAK scorer of one finding's baseline seed, in the run folder's layout.

    Training images: the finding's ``train`` rows; checkpoints
    ``03_baseline/<finding>/seed<s>/epoch_<ee>.pt`` for ``ee`` in ``checkpoints``
    (parameter ``trak_checkpoints``); traker state in ``04_trak/<finding>/seed<s>/``.
    ``cfg`` is the baseline's ``training.TrainConfig`` (architecture); images are fed
    through ``training.to_tensor``, exactly as in training. ``featurizer``: parameter
    ``trak_featurizer``. ``read_only``: write nothing into the run folder (see
    :class:`TrakScorer`). ``ensemble``: folders of subset models (parameter ``trak_models``);
    then their ``checkpoints`` epochs are TRAK's models, not the anchor's (:func:`ensemble_checkpoints`).
    """
    from . import models, training
    from .rundir import RunDir

    run = RunDir(run_path)
    ck_dir = run.model_dir("03_baseline", finding, seed)
    ckpts = {}
    if ensemble:
        ckpts = ensemble_checkpoints(ensemble, checkpoints)
    for e in ([] if ensemble else checkpoints):
        f = ck_dir / f"epoch_{int(e):02d}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"trak_checkpoints asks for epoch {e}, but {f} does not exist")
        ckpts[int(e)] = f
    if finding not in cohort.columns:
        raise KeyError(f"cohort table has no label column '{finding}'")
    train_rows = training.task_rows(cohort, finding, "train")[0]
    labels = cohort.set_index("row")[finding].dropna()
    save_dir = run.model_dir("04_trak", finding, seed)
    sc = TrakScorer(lambda: models.build_model(cfg.arch, num_outputs=1, width=cfg.width),
                    save_dir, images, train_rows, labels, ckpts, proj_dim=proj_dim,
                    lambda_reg=lambda_reg, device=device, projector_seed=projector_seed,
                    batch_size=batch_size, transform=training.to_tensor, featurizer=featurizer,
                    read_only=read_only, scratch_dir=scratch_dir)
    if not read_only:
        sc.save_config(finding=finding, seed=int(seed), arch=cfg.arch, width=int(cfg.width),
                       image_size=int(cfg.image_size), epochs=[int(e) for e in checkpoints],
                       ensemble=[str(Path(d).resolve().relative_to(run.path.resolve())) for d in ensemble or ()])
    return sc


def load_scorer(save_dir: str | Path, device: str = "cpu",
                scratch_dir: str | Path | None = None) -> TrakScorer:
    """Re-open a saved TRAK state (``04_trak/<finding>/seed<s>/``) written by notebook 04, read-only.

    ``load_scorer(dir).scores(target_rows)`` returns ``n_train x n_targets`` scores for
    the given cohort rows (labels from the cohort table for the scorer's finding); the
    features are read from ``dir``, not recomputed, and nothing in ``dir`` is written:
    target gradients are computed in memory, traker's scratch files go to
    ``scratch_dir`` (a new temporary folder if None). Folders written before
    ``trak_featurizer`` existed were featurized by traker.
    """
    from . import image_cache
    from .rundir import RunDir
    from .training import TrainConfig

    save_dir = Path(save_dir)
    f = save_dir / CONFIG
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: run notebook 04_trak for this finding and seed")
    c = json.loads(f.read_text())
    run_path = save_dir.parents[2]  # <run>/04_trak/<finding>/seed<s>
    cohort_dir = RunDir(run_path).stage_dir("01_cohort")
    cohort = pd.read_parquet(cohort_dir / "cohort.parquet")
    images = image_cache.open_cache(cohort_dir / "image_cache", c["image_size"], rows=cohort["row"])
    cfg = TrainConfig(arch=c["arch"], width=c["width"], image_size=c["image_size"])
    sc = baseline_scorer(run_path, c["finding"], c["seed"], cohort, images, cfg, c["epochs"],
                         proj_dim=c["proj_dim"], lambda_reg=c["lambda_reg"],
                         batch_size=c["batch_size"], projector_seed=c["projector_seed"],
                         device=device, featurizer=c.get("featurizer", "traker"), read_only=True,
                         scratch_dir=scratch_dir, ensemble=[Path(run_path) / d for d in c.get("ensemble", [])])
    return sc


# -- attribution quality: planted harm --------------------------------------
def harm_ranking_auroc(scores_by_seed: Sequence[np.ndarray], planted, clusters=None, *, n_boot: int = 1000,
                       ci_level: float = 0.95, random_state=0) -> dict:
    """How well low scores pick out planted harmful training images: AUROC with its interval.

    ``scores_by_seed``: one score per training image and seed (the same training
    images in every seed; for example ``tau(g)_i`` of a group, or an alignment
    score). A harmful image should score low, so the AUROC is that of ``-score``
    against ``planted`` (True for a planted image): 1 = every planted image
    below every other, 0.5 = no better than chance, below 0.5 = planted images
    score *high*. Ties count one half (:func:`metrics.metric_values`).

    Interval as in :mod:`d3m_lib.metrics`: a patient-level bootstrap of the
    training images (``clusters``: their patient ids; None: each image its own),
    the same resamples for every seed; point = mean over seeds, interval = the
    interval of that mean (:func:`metrics.seed_mean_interval`).
    Returns ``value, lo, hi, seed_values, n, n_planted``.
    """
    from .metrics import cluster_bootstrap_weights, metric_values, seed_mean_interval

    planted = np.asarray(planted, dtype=bool)
    n = len(planted)
    if not 0 < planted.sum() < n:
        raise ValueError(f"planted marks {int(planted.sum())} of {n} images; an AUROC needs both kinds")
    if not scores_by_seed:
        raise ValueError("no scores given")
    clusters = np.arange(n) if clusters is None else np.asarray(clusters)
    w = np.ones((1, n))
    if n_boot:
        w = np.vstack([w, cluster_bootstrap_weights(np.zeros(n), clusters, n_boot, random_state)])
    reps = []
    for s in scores_by_seed:
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if len(s) != n:
            raise ValueError(f"{len(s)} scores but {n} planted flags")
        reps.append(metric_values("auroc", planted, None, -s, w))
    reps = np.array(reps)
    ci = seed_mean_interval(reps, ci_level, random_state=random_state) if n_boot else dict(lo=np.nan, hi=np.nan)
    lo, hi = ci["lo"], ci["hi"]
    return dict(value=float(reps[:, 0].mean()), lo=lo, hi=hi, seed_values=reps[:, 0].tolist(),
                n=int(n), n_planted=int(planted.sum()))


# -- linear datamodeling score ----------------------------------------------
def _subsets(rng: np.random.Generator, n_train: int, n_models: int, subset_fraction: float) -> np.ndarray:
    k = int(round(subset_fraction * n_train))
    masks = np.zeros((n_models, n_train), dtype=bool)
    for m in masks:
        m[rng.choice(n_train, size=k, replace=False)] = True
    return masks   # (models, train)


def lds_subsets(n_train: int, n_models: int, subset_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """The ``n_models x n_train`` subset masks :func:`lds` draws for ``seed``, in the order it asks for
    their margins (so the models can be trained beforehand, in parallel)."""
    return _subsets(np.random.default_rng(seed), n_train, n_models, subset_fraction)


def ensemble_subsets(n_train: int, n_models: int, subset_fraction: float, trak_seed: int, seed: int) -> np.ndarray:
    """The ``n_models x n_train`` training subsets of one seed's TRAK ensemble (TRAK's Algorithm 1: each model
    sees a random ``subset_fraction`` of the training images). Deterministic in ``(trak_seed, seed)``; another
    ``trak_seed`` or training seed draws other subsets (LDS uses a stream of its own)."""
    return _subsets(np.random.default_rng(np.random.SeedSequence([int(trak_seed), int(seed), 0x7EA4])),
                    n_train, n_models, subset_fraction)


def ensemble_seed(trak_seed: int, seed: int, model: int) -> int:
    """Training seed (initialisation and batch order) of subset model ``model`` of one seed's ensemble."""
    return int(np.random.SeedSequence([int(trak_seed), int(seed), int(model), 0x5EED]).generate_state(1)[0]
               % (2 ** 31))


ENSEMBLE_ID = 1000   # model id of subset model m, checkpoint epoch e: m * ENSEMBLE_ID + e


def ensemble_checkpoints(model_dirs: Sequence[str | Path], epochs: Sequence[int]) -> dict[int, Path]:
    """TRAK's model ids of an ensemble: every ``epochs`` checkpoint of every subset model's folder."""
    out = {}
    for m, d in enumerate(model_dirs):
        for e in epochs:
            f = Path(d) / f"epoch_{int(e):02d}.pt"
            if not f.is_file():
                raise FileNotFoundError(f"TRAK ensemble model {m}: checkpoint {f} does not exist")
            out[m * ENSEMBLE_ID + int(e)] = f
    return out


def ensemble_quality_table(record: Mapping, part: str = "stability") -> pd.DataFrame:
    """Display table of ``benchmarks/bench_trak_ensemble.py``'s record, one row per ensemble size, in two parts
    that each fit a page: ``stability`` (LDS, agreement of two independent ensembles, seconds) and ``harm``
    (AUROC of -A_i and precision of the k lowest per planted mechanism)."""
    from .conclusions import interval_text

    rows = pd.DataFrame(record["rows"])
    out = pd.DataFrame({"TRAK models": [f"anchor, epochs {', '.join(map(str, record['checkpoints_anchor']))}"
                                        if v == "anchor" else v.replace("M=", "M = ") for v in rows["variant"]]})
    if part == "stability":
        out["LDS [95% CI]"] = [interval_text(v, lo, hi) for v, lo, hi in zip(rows["lds"], rows["lds_lo"],
                                                                                rows["lds_hi"])]
        out["Spearman of A_i, two ensembles"] = rows["spearman_ab"].map("{:.2f}".format)
        out["removed sets shared"] = rows["removed_overlap"].map("{:.0%}".format)
        out["seconds: train + featurize"] = [f"{t:.0f} + {f:.0f}" for t, f in zip(rows["train_s"],
                                                                                  rows["featurize_s"])]
        return out
    if part != "harm":
        raise ValueError(f"part must be 'stability' or 'harm', got {part!r}")
    kinds = [c[len("auroc_"):] for c in rows.columns if c.startswith("auroc_") and c != "auroc_all"]
    for kind in kinds:
        out[f"AUROC: {kind.replace('_', ' ')}"] = rows[f"auroc_{kind}"].map("{:.2f}".format)
    for kind in kinds:
        out[f"precision: {kind.replace('_', ' ')} (base {rows[f'base_rate_{kind}'].iloc[0]:.3f})"] = \
            rows[f"precision_{kind}"].map("{:.3f}".format)
    return out


def lds(scores: np.ndarray, train_subset_margins: Callable[[np.ndarray], np.ndarray],
        n_models: int, subset_fraction: float = 0.5, seed: int = 0, n_boot: int = 1000,
        ci_level: float = 0.95) -> dict:
    """Linear datamodeling score (Park et al. 2023, Eq. 5).

    Trains ``n_models`` models on random ``subset_fraction`` subsets of the training set
    (``train_subset_margins(mask)`` returns the trained model's margins on the targets),
    predicts each margin as the sum of the kept images' scores, and averages the
    Spearman correlation between predicted and actual margins over targets, with a
    bootstrap interval over targets.

    Args:
        scores: ``n_train x n_targets`` TRAK scores.
    """
    if n_models < 3:
        raise ValueError(f"trak_lds_models={n_models}: need at least 3 subset models")
    rng = np.random.default_rng(seed)
    n_train, n_targets = scores.shape
    masks = _subsets(rng, n_train, n_models, subset_fraction)
    actual = np.array([np.asarray(train_subset_margins(m), dtype=np.float64) for m in masks])
    return lds_from_models(scores, masks, actual, n_boot, ci_level, rng)


def lds_from_models(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, n_boot: int = 1000,
                    ci_level: float = 0.95, seed=0) -> dict:
    """LDS from models already trained: ``masks`` (models x train) their training subsets, ``actual``
    (models x targets) their margins on the targets (:func:`lds`'s second half)."""
    masks, actual = np.asarray(masks, dtype=bool), np.asarray(actual, dtype=np.float64)
    n_models, n_targets = len(masks), scores.shape[1]
    if n_models < 3:
        raise ValueError(f"LDS needs at least 3 subset models, got {n_models}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    predicted = masks.astype(np.float64) @ scores
    rho = np.array([stats.spearmanr(predicted[:, j], actual[:, j]).statistic
                    for j in range(n_targets)])
    ok = ~np.isnan(rho)
    boot = [np.mean(rng.choice(rho[ok], size=ok.sum())) for _ in range(n_boot)] if ok.any() else [np.nan]
    a = (1 - ci_level) / 2
    return {"lds": float(np.mean(rho[ok])) if ok.any() else math.nan,
            "lo": float(np.quantile(boot, a)), "hi": float(np.quantile(boot, 1 - a)),
            "n_targets": int(ok.sum()), "n_targets_constant": int((~ok).sum()),
            "n_models": int(n_models), "per_target": rho}
