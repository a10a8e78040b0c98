"""Power of the study's primary contrast: its minimum detectable effect, and the size an answer needs.

The primary contrast is a paired difference ``D`` (say D3M − random in test
worst-group accuracy) averaged over S training seeds and scored on one test set.
Its variance has two parts:

* ``s_b^2``, the **between-seed** variance: how much one seed's difference moves
  with the training seed, on the fixed test set (the sample variance of the
  per-seed differences);
* ``s_w^2``, the **test-sampling** variance of the seed mean: how much the mean
  moves when other patients are tested (the patient bootstrap with the seeds
  held fixed).

``Var(mean) ~ s_b^2 / S + s_w^2``. The minimum detectable effect at power ``1 - β``
with a two-sided test at level ``α`` is ``(t_{1-α/2} + t_{1-β}) sqrt(s_b^2 / S + s_w^2)``, with
the interval's Welch–Satterthwaite degrees of freedom (:func:`d3m_lib.metrics.mean_df`: S − 1
when seeds dominate, so few seeds cost more than the normal formula says);
a test set ``m`` times larger (``m`` times the patients of every group) divides
``s_w^2`` by ``m``. The two-level interval of :mod:`d3m_lib.metrics` has the same
two parts, so a run whose minimum detectable effect is below the true effect
will, four times in five, give an interval that excludes 0.

``python -m d3m_lib power RUN [--effect 0.05]`` prints these figures for a
finished run (:func:`from_run`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as student_t

from .metrics import mean_df, variance_parts

FACTORS = (1, 2, 4, 8)   # test-set sizes a plan considers, as multiples of the run's


@dataclass(frozen=True)
class Power:
    """Variance components and minimum detectable effect of one paired contrast ``a − b``."""

    finding: str
    a: str
    b: str
    n_seeds: int
    test_patients: int          # patients in the test set (every group)
    worst_patients: int         # patients of the test set's smallest eligible group
    estimate: float             # mean over seeds of the paired difference
    s_b: float                  # between-seed SD of one seed's difference
    s_w: float                  # test-sampling SD of the seed mean
    alpha: float = 0.05
    power: float = 0.80

    def q(self, seeds: int, test_factor: float = 1.0) -> float:
        """``t_{df,1−α/2} + t_{df,1−β}`` at the interval's degrees of freedom (:func:`metrics.mean_df`)."""
        df = mean_df(seeds, self.s_b ** 2, self.s_w ** 2 / test_factor)
        return float(student_t.ppf(1 - self.alpha / 2, df) + student_t.ppf(self.power, df))

    def mde_at(self, seeds: int, test_factor: float = 1.0) -> float:
        """Minimum detectable effect with ``seeds`` seeds and a test set ``test_factor`` times this one's."""
        if not (math.isfinite(self.s_b) and math.isfinite(self.s_w)):
            return float("nan")
        return self.q(seeds, test_factor) * math.sqrt(self.s_b ** 2 / seeds + self.s_w ** 2 / test_factor)

    @property
    def mde(self) -> float:
        """This run's minimum detectable effect."""
        return self.mde_at(self.n_seeds)

    def seeds_needed(self, effect: float, test_factor: float = 1.0) -> int | None:
        """Fewest seeds whose MDE is at most ``effect`` (None: the test set alone is too small)."""
        z = float(norm.ppf(1 - self.alpha / 2) + norm.ppf(self.power))
        room = (effect / z) ** 2 - self.s_w ** 2 / test_factor   # the large-S limit: t -> z
        if not math.isfinite(room) or room <= 0:
            return None
        S = max(2, math.ceil(self.s_b ** 2 / room))
        while self.mde_at(S, test_factor) > effect:   # t quantiles exceed z at few seeds
            S += 1
        return S

    def plan(self, effect: float, factors=FACTORS) -> pd.DataFrame:
        """Per test-set size: its patients, the seeds needed for ``effect``, and the MDE at this run's seeds."""
        rows = []
        for m in factors:
            need = self.seeds_needed(effect, m)
            rows.append(dict(test_factor=m, test_patients=int(round(m * self.test_patients)),
                             worst_group_patients=int(round(m * self.worst_patients)),
                             seeds_needed=need if need is not None else pd.NA,
                             mde_at_run_seeds=self.mde_at(self.n_seeds, m)))
        return pd.DataFrame(rows).astype({"seeds_needed": "Int64"})

    def summary(self) -> pd.DataFrame:
        """One row: the contrast, its seeds and test size, s_b, s_w and the MDE."""
        return pd.DataFrame([dict(finding=self.finding, contrast=f"{self.a} − {self.b}", seeds=self.n_seeds,
                                  test_patients=self.test_patients, worst_group_patients=self.worst_patients,
                                  estimate=self.estimate, s_between_seeds=self.s_b, s_test=self.s_w,
                                  mde=self.mde)])

    def text(self, effect: float | None = None) -> str:
        """What ``python -m d3m_lib power`` prints."""
        pct = f"{round(100 * self.power)}% power, two-sided {self.alpha:g}"
        if self.n_seeds < 2:
            return (f"primary contrast: {self.finding}, test worst-group accuracy, {self.a} − {self.b}: "
                    f"{self.estimate:+.3f} from one seed; the between-seed variance, and so the minimum "
                    "detectable effect, needs at least two seeds")
        lines = [f"primary contrast: {self.finding}, test worst-group accuracy, {self.a} − {self.b}",
                 f"  seeds {self.n_seeds}; test patients {self.test_patients} "
                 f"(smallest eligible group {self.worst_patients})",
                 f"  estimate {self.estimate:+.3f}; between-seed SD s_b = {self.s_b:.3f}; "
                 f"test-sampling SD of the mean s_w = {self.s_w:.3f}",
                 f"  minimum detectable effect ({pct}): {self.mde:.3f}"]
        if effect is not None:
            lines.append(f"  to detect {effect:g}:")
            for r in self.plan(effect).itertuples():
                need = ("not reachable: test sampling alone exceeds it" if pd.isna(r.seeds_needed)
                        else f"{int(r.seeds_needed)} seeds")
                lines.append(f"    test set x{r.test_factor} ({r.test_patients} patients, "
                             f"{r.worst_group_patients} in the smallest group): {need}")
        return "\n".join(lines)


def from_engine(engine, a: str, b: str, finding: str = "", metric: str = "accuracy",
                alpha: float = 0.05, power: float = 0.80) -> Power:
    """:class:`Power` of the paired worst-group contrast ``a − b`` of a :class:`~d3m_lib.metrics.GroupMetrics`."""
    _, d = engine.paired_worst(a, b, metric)
    pts = d[:, 0]
    if engine.n_boot < 2:
        raise ValueError("power needs bootstrap replicates (n_boot >= 2)")
    _, s_b2, s_w2 = variance_parts(d)   # the interval's own two parts
    s_b, s_w = math.sqrt(s_b2) if math.isfinite(s_b2) else float("nan"), math.sqrt(s_w2)
    counts = engine.counts
    elig = [g for g in engine.eligible] or list(engine.groups)
    return Power(finding=finding, a=a, b=b, n_seeds=len(pts), test_patients=int(counts.loc["All", "n_clusters"]),
                 worst_patients=int(counts.loc[elig, "n_clusters"].min()), estimate=float(np.nanmean(pts)),
                 s_b=s_b, s_w=s_w, alpha=alpha, power=power)


def from_comparison(mc, cfg, finding: str | None = None) -> Power:
    """:class:`Power` of the run's pre-specified primary contrast (``primary_contrast``, first finding)."""
    a, b = cfg["primary_contrast"]
    finding = finding or mc.findings[0]
    eng = mc.engine(finding, "test")
    missing = [m for m in (a, b) if m not in eng.models]
    if missing:
        raise ValueError(f"parameter 'primary_contrast' = {[a, b]!r}: arm(s) {missing} were not run for "
                         f"{finding} (arms: {eng.models})")
    return from_engine(eng, a, b, finding, alpha=1 - cfg["ci_level"])


def from_run(run_dir) -> Power:
    """:class:`Power` of a finished run's primary contrast, from its stage-05 predictions."""
    from .analysis import MethodComparison
    from .rundir import RunDir

    rd = RunDir(run_dir)
    cfg = rd.config()
    if cfg is None:
        raise FileNotFoundError(f"{run_dir}: no config.json; is this a run folder?")
    d05 = rd.require("05_d3m")
    mc = MethodComparison(pd.read_parquet(d05 / "predictions.parquet"), None,
                          rd.cohort(columns=["row", "group", "split", "subject_id"]), n_boot=cfg.n_boot,
                          ci_level=cfg.ci_level, seed=cfg.stats_seed, min_group_n=cfg.min_group_n)
    return from_comparison(mc, cfg)
