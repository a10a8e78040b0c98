"""The study's one configuration: every parameter defined once, checked before any work.

Each :class:`Param` has a type, a default (the demo's value), the allowed values
and one line of help, and names the stages that read it (the first is the stage
that *owns* it: where its parameter cell lists it). ``kind="view"`` parameters
change what a notebook shows or how fast it runs, never a result, so they enter
no fingerprint.

:func:`resolve` turns a parameter file plus overrides into a :class:`Config`,
refusing unknown names (with suggestions), wrong types, values outside the
allowed ones and inconsistent combinations, each with a message that names the
parameter and what is allowed. ``python -m d3m_lib params`` prints the table.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from .constants import FINDINGS

S01, S02, S03, S04, S05, S06, S07 = ("01_cohort", "02_scan", "03_baseline", "04_trak", "05_d3m",
                                     "06_per_race", "07_error_analysis")
TRAIN = (S02, S03, S04, S05)
STATS = (S02, S03, S04, S05, S06)


class ConfigError(ValueError):
    """A parameter name or value that the study cannot run with."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    stages: tuple[str, ...]
    kind: str = "stage"               # "stage": enters fingerprints; "view": display/speed only
    type: str = "str"                 # int, float, bool, str, path, int_list, float_list, str_list, any
    choices: tuple | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None   # returns what is wrong, or None

    @property
    def owner(self) -> str:
        return self.stages[0]


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if v is None:
            return None
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None
    return check


def _unique_nonempty(v):
    if v is not None and (len(v) == 0 or len(set(v)) != len(v)):
        return "must be a non-empty list without repeats"
    return None


def _unknown(v, choices, what: str, listing: str) -> str | None:
    """The entries of ``v`` not in ``choices``, each with its closest match; None when all are known."""
    bad = [b for b in v if b not in choices]
    if not bad:
        return None
    hints = {b: difflib.get_close_matches(b, choices, n=1) for b in bad}
    said = ", ".join(f"{b!r}" + (f" (did you mean {hints[b][0]!r}?)" if hints[b] else "") for b in bad)
    return f"unknown {what}(s) {said}; {listing}"


def _findings(v):
    if v is None:
        return None
    return (_unknown(v, FINDINGS, "finding", f"the 14 CheXpert findings are: {', '.join(FINDINGS)}")
            or _unique_nonempty(v))


def _selectable() -> tuple[str, ...]:
    from . import methods

    return methods.selectable()


METHODS = _selectable()   # the registry's selectable arms (d3m_lib.methods)


def _methods(v):
    if v is None:
        return None
    return _unknown(v, METHODS, "method", f"choose from {', '.join(METHODS)}") or _unique_nonempty(v)


def _positive_list(v):
    if v is not None and any(not x > 0 for x in v):
        return "every entry must be positive"
    return _unique_nonempty(v)


def _fractions(v):
    if v is not None and any(not 0 < x < 1 for x in v):
        return "every entry must be a share of the training images strictly between 0 and 1"
    return _unique_nonempty(v)


def _split_shares(v):
    if v is not None and (len(v) != 3 or min(v) <= 0 or abs(sum(v) - 1) > 1e-6):
        return "must be three positive shares (train, validate, test) that sum to 1"
    return None


def _contrast(v):
    if v is None:
        return None
    if len(v) != 2 or v[0] == v[1]:
        return "must name two different arms, e.g. [d3m, random]"
    arms = ("erm", *METHODS)
    return _unknown(v, arms, "arm", f"choose from {', '.join(arms)}")


P = Param
PARAMS: tuple[Param, ...] = (
    # -- data (stage 01) -------------------------------------------------------
    P("dataset", "mimic", "mimic (MIMIC-CXR-JPG + MIMIC-IV, real or synthetic) or nih", (S01,),
      choices=("mimic", "nih")),
    P("synthetic", True, "generate a synthetic MIMIC-layout cohort instead of reading MIMIC", (S01,),
      type="bool"),
    P("mimic_cxr_dir", None, "folder holding files/ and mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz",
      (S01,), type="path", nullable=True),
    P("mimic_iv_dir", None, "folder holding hosp/admissions.csv.gz and hosp/patients.csv.gz", (S01,),
      type="path", nullable=True),
    P("synthetic_n_patients", 1200, "patients in the synthetic cohort", (S01,), type="int",
      check=_range(50)),
    P("synthetic_image_size", 64, "pixels of the synthetic JPEGs", (S01,), type="int", check=_range(16)),
    P("synthetic_seed", 0, "seed of the synthetic cohort", (S01,), type="int"),
    P("synthetic_scenario", "planted", "which biases the synthetic cohort plants: planted (shortcut + label "
      "flips, undone by removal), null (nothing), flips_only, shortcut_only, non_removable (a device difference "
      "only) or realistic (all three, noisy evaluation labels); d3m_lib.synthetic.SCENARIOS", (S01,),
      choices=("planted", "null", "flips_only", "shortcut_only", "non_removable", "realistic")),
    P("synthetic_split", [0.5, 0.2, 0.3], "train, validate and test shares of the synthetic cohort's patients "
      "(a larger test share buys power cheaply: evaluation costs no training)", (S01,), type="float_list",
      check=_split_shares),
    P("nih_dir", None, "NIH ChestX-ray14 folder holding Data_Entry_2017_v2020.csv and images/", (S01,),
      type="path", nullable=True),
    P("nih_group", "sex", "protected group on NIH (no race there): sex or age_band", (S01,),
      choices=("sex", "age_band")),
    P("nih_split_seed", 0, "seed of the patient-disjoint NIH split", (S01,), type="int"),
    P("uncertain_labels", "negative", "CheXpert -1.0: negative (U-Zeros), positive (U-Ones) or drop",
      (S01,), choices=("negative", "positive", "drop")),
    P("race_rule", "mode_recent", "per-patient race rule (d3m_lib.race.patient_race)", (S01,),
      choices=("mode_recent", "unknown_if_conflict", "most_recent")),
    P("missing_race", "unknown", "patients without any admission: unknown group or exclude", (S01,),
      choices=("unknown", "exclude")),
    P("image_size", 24, "pixels of the cached images the models see (px x px)", (S01,), type="int",
      check=_range(8, 1024)),
    P("max_unreadable_share", 0.01, "stop when more than this share of the cohort's images cannot be decoded",
      (S01,), type="float", check=_range(0, 1)),
    P("cohort_min_group_n", 20, "a group counts with this many labelled images in train and in validate; "
      "the study needs two such groups", (S01,), type="int", check=_range(1)),
    P("max_missing_race_share", 0.5, "warn when more than this share of patients has no MIMIC-IV admission",
      (S01,), type="float", check=_range(0, 1)),
    P("max_drop_share", 0.10, "warn when the steps after the frontal-view filter drop more than this share",
      (S01,), type="float", check=_range(0, 1)),
    P("cache_workers", 1, "processes decoding images", (S01,), kind="view", type="int", check=_range(1)),
    # -- privacy: what the notebooks may show (never a result) -------------------
    P("credentialed", "auto", "true, false or auto (true for real MIMIC)", (S01, S04, S06, S07),
      kind="view", type="any", choices=(True, False, "auto")),
    P("publish_identifiers", False, "show subject/study/image ids of credentialed data", (S01, S06, S07),
      kind="view", type="bool"),
    P("publish_images", False, "show X-ray images of credentialed data", (S01, S04, S06, S07),
      kind="view", type="bool"),
    # -- models and schedule -------------------------------------------------------
    P("arch", "resnet9", "resnet9 (fast) or resnet50 (as in the source study)", TRAIN,
      choices=("resnet9", "resnet50")),
    P("width", 8, "ResNet-9 width (ignored by resnet50)", TRAIN, type="int", check=_range(1)),
    P("pretrained", None, "local state_dict file to start from, or imagenet (resnet50: torchvision's ImageNet "
      "weights, from the torch hub cache or the file D3M_RESNET50_IMAGENET names; downloaded only without either)",
      (S02, S03),
      type="path", nullable=True),
    P("batch_size", 128, "training batch size", TRAIN, type="int", check=_range(1)),
    P("lr", 0.2, "peak learning rate", TRAIN, type="float", check=_range(0, lo_open=True)),
    P("weight_decay", 5e-4, "weight decay", TRAIN, type="float", check=_range(0)),
    P("device", "auto", "auto, cpu or cuda", TRAIN, kind="view", choices=("auto", "cpu", "cuda")),
    # -- the training grid (d3m_lib.grid): how fast, never what -------------------------------
    P("grid_workers", None, "trainings run at once (null: one per GPU on CUDA, else one per "
      "grid_threads_per_worker CPU cores (one per core by default), at most 8; 1: in this process)",
      (S03, S04, S05), kind="view",
      type="int", nullable=True, check=_range(1)),
    P("grid_backend", "local", "local (worker processes on this machine) or ray (the cluster at ray_address, "
      "one task per GPU or per grid_cpus_per_task CPUs)", (S03, S04, S05), kind="view",
      choices=("local", "ray")),
    P("grid_threads_per_worker", None, "torch threads of each training (every worker, and this process with one "
      "worker); null: 1 on the CPU, the CPU cores shared among the workers on CUDA", (S03, S04, S05), kind="view",
      type="int", nullable=True, check=_range(1)),
    P("grid_cpus_per_task", 1.0, "CPUs a Ray task asks for (ray backend)", (S03, S04, S05), kind="view",
      type="float", check=_range(0, lo_open=True)),
    P("max_retries", 1, "times a failed training is tried again before the stage stops", (S03, S04, S05),
      kind="view", type="int", check=_range(0)),
    P("ray_address", None, "Ray cluster of the ray grid backend and of trak_ray_workers (null: a local Ray; "
      "'auto': the running cluster; 'ray://head:10001')", (S03, S04, S05), kind="view", nullable=True),
    P("seeds", [0, 1, 2], "one baseline (and one retraining per method) per seed", (S03, S04, S05),
      type="int_list", check=lambda v: ("every seed must be >= 0 (numpy and torch seeds are non-negative)"
                                        if v is not None and any(x < 0 for x in v) else _unique_nonempty(v))),
    P("epochs_anchor", 5, "epochs of the first training call (the base model D3M starts from)",
      (S03, S04, S05), type="int", check=_range(1)),
    P("anchor_anneal", True, "the anchor call warms up and decays its learning rate to 0 within epochs "
      "1..epochs_anchor (a converged anchor); false: one curve over all epochs, the anchor mid-descent",
      (S03,), type="bool"),
    P("epochs_more", 10, "epochs of the second call (continued ERM, D3M and the controls)",
      (S03, S04, S05), type="int", check=_range(0)),
    P("threshold_rule", "youden", "decision threshold rule, chosen on validate", (S02, S03, S05),
      choices=("youden", "max_accuracy", "fixed_0.5")),
    # -- statistics ------------------------------------------------------------------
    P("n_boot_descriptive", 2000, "bootstrap replicates of the descriptive intervals of notebooks 02-04 (no "
      "claim rests on them; also notebook 06's per-group AUROC and notebook 07)", (S02, S03, S04, S06, S07),
      type="int", check=_range(10)),
    P("n_boot", 10000, "bootstrap replicates of the comparisons in notebook 06, where claims are made (10,000: "
      "a bound moves by less than 0.005 when only stats_seed changes; tests/test_intervals.py)", (S06,),
      type="int", check=_range(10)),
    P("ci_level", 0.95, "interval level", (*STATS, S07), type="float", check=_range(0, 1, True, True)),
    P("stats_seed", 0, "seed of the bootstrap of the comparisons (notebook 06); the descriptive intervals of "
      "notebooks 02-04 use seed 0", (S06,), type="int"),
    P("primary_contrast", ["d3m", "random"], "the pre-specified primary contrast [a, b]: test worst-group "
      "accuracy of arm a minus arm b on the primary finding (the first chosen); every other comparison is "
      "secondary (Holm-corrected)", (S06,), type="str_list", check=_contrast),
    P("smallest_effect", 0.05, "the smallest difference worth having (delta): an interval inside "
      "[-delta, delta] reads 'smaller than delta'", (S06,), type="float", check=_range(0, 1, True, True)),
    # -- discrepancy scan ----------------------------------------------------------------
    P("scan_epochs", 4, "epochs of the shared multi-label scan model", (S02,), type="int", check=_range(1)),
    P("scan_seed", 0, "seed of the scan model", (S02,), type="int"),
    P("scan_top_k", 1, "findings to continue with when `findings` is null", (S02,), type="int",
      check=_range(1, 14)),
    P("findings", None, "explicit list of CheXpert findings; null: the scan's top-k", (S02,),
      type="str_list", nullable=True, check=_findings),
    P("min_group_n", 15, "labelled images a group needs in each split (eligibility, worst group)",
      (S02, S05, S06, S07), type="int", check=_range(1)),
    P("min_group_pos", 5, "positives a group needs in each split for a finding to be eligible", (S02,),
      type="int", check=_range(0)),
    # -- TRAK --------------------------------------------------------------------------------
    P("trak_checkpoints", [5], "epochs (up to epochs_anchor) whose checkpoints TRAK averages over: of each "
      "ensemble model, or of the anchor when trak_models is 0 (then e.g. [3, 4, 5]); never continued-ERM epochs",
      (S04,),
      type="int_list", check=_unique_nonempty),
    P("trak_proj_dim", 256, "JL projection dimension (below the number of training images)", (S04,),
      type="int", check=_range(1)),
    P("trak_lambda_reg", 0.0, "ridge term added to X^T X", (S04,), type="float", check=_range(0)),
    P("trak_featurizer", "factorized", "factorized (per-layer Kronecker projections, no per-example gradients) "
      "or traker (per-example gradients, dense JL projection)", (S04,), choices=("factorized", "traker")),
    P("trak_ray_workers", 0, "featurize on this many Ray workers (0: in this process; needs the ray extra)",
      (S04,), kind="view", type="int", check=_range(0)),
    P("trak_batch_size", 128, "images per per-example-gradient batch", (S04,), type="int", check=_range(1)),
    P("trak_seed", 0, "projection seed and choice of example images", (S04,), type="int"),
    P("trak_models", 4, "TRAK ensemble size M: 0 attributes the anchor's own trak_checkpoints (one model); M >= 1 "
      "averages TRAK over M models per seed, each trained with the anchor's recipe on a random "
      "trak_subset_fraction of the training images (TRAK's Algorithm 1), at its trak_checkpoints epochs",
      (S04,), type="int", check=_range(0)),
    P("trak_subset_fraction", 0.5, "share of the training images each ensemble model sees", (S04,),
      type="float", check=_range(0, 1, True, True)),
    P("trak_lds", False, "compute the linear datamodeling score of the first finding and seed (trains "
      "trak_lds_models anchor models on random subsets; params/lds.yaml)", (S04,), type="bool"),
    P("trak_lds_models", 20, "subset models for LDS (at least 20)", (S04,), type="int", check=_range(20)),
    P("trak_lds_subset_fraction", 0.5, "share of training images each subset model sees", (S04,),
      type="float", check=_range(0, 1, True, True)),
    P("trak_lds_targets", 100, "validation images whose margins LDS predicts (at least 100)", (S04,),
      type="int", check=_range(100)),
    # -- D3M -------------------------------------------------------------------------------------
    P("d3m_groups", "race", "groups D3M weighs on validation: race, or race_x_label (race x label, as the "
      "D3M paper's (class, attribute) groups: can aim at one race's positives)", (S05,),
      choices=("race", "race_x_label")),
    P("d3m_weighting", "softmax", "softmax (source study) or linear (public D3M code)", (S05,),
      choices=("softmax", "linear")),
    P("d3m_beta", 1.0, "softmax temperature on the group losses", (S05,), type="float", check=_range(0)),
    P("d3m_selection", "validated_k", "validated_k (drop the k lowest, k chosen on validation worst-group "
      "accuracy from d3m_k_grid, as the D3M paper tunes it), negative (drop A_i < 0) or k_lowest (drop d3m_k)",
      (S05,), choices=("validated_k", "negative", "k_lowest")),
    P("d3m_k", None, "images to drop when d3m_selection is k_lowest", (S05,), type="int", nullable=True,
      check=_range(1)),
    P("d3m_k_grid", [0.05, 0.1, 0.2], "removal curve: shares of the training images removed (k = share x "
      "n_train); each point retrains D3M and Auto-D3M on every seed (in a batch order of their own); validated_k "
      "takes the k with the highest validation worst-group accuracy averaged over all seeds (ties: the smaller k)",
      (S05,), type="float_list", check=_fractions),
    P("random_draws", 3, "draws of each count-matched random control per seed, each its own training",
      (S05,), type="int", check=_range(1)),
    P("removal_seed", 0, "seed of random removal and group balancing (with the training seed, the draw and the "
      "arm)", (S05,), type="int"),
    P("d3m_auto_method", "pca_per_class", "Auto-D3M pseudo-groups: pca_per_class (the D3M paper: per class, "
      "L2-normalised score rows, sign of the top PC), pca (one PCA over all) or kmeans", (S05,),
      choices=("pca_per_class", "pca", "kmeans")),
    P("methods", None, "arms to retrain (d3m_lib.methods); null: the default arms the data allows (on "
      "synthetic data d3m, d3m_cells, random, auto_d3m, auto_random, loss_filter, rwg, dfr and oracle; on real "
      "data all but oracle); balanced, group_dro, jtt and oracle_k run when named (params/baselines.yaml names "
      "every arm)",
      (S05,), type="str_list", nullable=True, check=_methods),
    P("group_labels", "training", "the protected-group labels the arms may use: training (every training and "
      "validation image) or validation (validation images only, as for a practitioner who never labelled the "
      "training set); arms needing more are refused", (S05,), choices=("training", "validation")),
    P("group_dro_eta_grid", [0.01, 0.1, 1.0], "GroupDRO: step sizes of the online group weights tried (chosen on "
      "validation worst-group accuracy averaged over seeds, ties: the first listed)", (S05,), type="float_list",
      check=_positive_list),
    P("jtt_lambda_grid", [5.0, 20.0, 50.0], "JTT: upsampling factors of the anchor's error set tried (the same "
      "rule)", (S05,), type="float_list", check=_positive_list),
    P("dfr_c_grid", [1.0, 0.3, 0.1, 0.03], "DFR: inverse L1 strengths of the last-layer refit tried, chosen on "
      "the tuning half of validation by the same rule", (S05,), type="float_list", check=_positive_list),
    P("synthetic_ground_truth", None, "planted_ground_truth.csv.gz; null: the one beside the synthetic "
      "cohort", (S05,), type="path", nullable=True),
    # -- error analysis ------------------------------------------------------------------------------
    P("n_targets", 4, "misclassified images of the worst group analysed per finding", (S07,), type="int",
      check=_range(1)),
    P("n_top", 8, "training images shown per target and direction", (S07,), type="int", check=_range(1)),
    P("interactive", None, "the ipywidgets explorer: null = live whenever a widget frontend (JupyterLab) "
      "runs the kernel, still figure otherwise; true/false force it", (S07,), kind="view", type="bool",
      nullable=True),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
assert len(BY_NAME) == len(PARAMS), "a parameter is defined twice"

# Parameters that name files: relative values resolve against the folder the user started from.
PATH_PARAMS = tuple(p.name for p in PARAMS if p.type == "path")


def _check_type(p: Param, v: Any) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(v, what is wrong)``; ints are accepted where floats are."""
    if v is None:
        if not p.nullable and p.choices and "null" in p.choices:
            return "null", None   # YAML reads an unquoted `null` as None; here it can only mean the choice
        return v, None if p.nullable else "must not be null"
    t = p.type
    if t == "int":
        return v, None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"
    if t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return v, "must be a finite number"
        return float(v), None
    if t == "bool":
        return v, None if isinstance(v, bool) else "must be true or false"
    if t in ("str", "path"):
        return v, None if isinstance(v, str) and v != "" else "must be a non-empty string"
    if t == "int_list":
        ok = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        return (list(v), None) if ok else (v, "must be a list of integers, e.g. [0, 1, 2]")
    if t == "float_list":
        ok = isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and math.isfinite(x) for x in v)
        return ([float(x) for x in v], None) if ok else (v, "must be a list of numbers, e.g. [0.02, 0.05]")
    if t == "str_list":
        ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
        return (list(v), None) if ok else (v, "must be a list of names, e.g. [a, b]")
    return v, None


def check_value(name: str, value: Any) -> Any:
    """The checked (and normalised) value of one parameter, or :class:`ConfigError`."""
    p = BY_NAME[name]
    v, err = _check_type(p, value)
    if err is None and p.choices is not None and v is not None and not any(
            v == c and type(v) is type(c) for c in p.choices):
        err = f"must be one of {', '.join(map(repr, p.choices))}"
    if err is None and p.check is not None:
        err = p.check(v)
    if err:
        raise ConfigError(f"parameter {name!r} = {value!r}: {err} ({p.help})")
    return v


def check_names(names: Iterable[str], where: str = "") -> None:
    unknown = [k for k in names if k not in BY_NAME and k != "run_dir"]
    if not unknown:
        return
    lines = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(BY_NAME), n=3, cutoff=0.6)
        lines.append(f"  {k}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ConfigError(f"unknown parameter(s){' in ' + where if where else ''}:\n" + "\n".join(lines)
                      + "\n`python -m d3m_lib params` lists them all")


def _check_combination(c: Mapping[str, Any], base: Path | None) -> list[str]:
    """Problems between parameters, and with the files and devices they name."""
    errs = []
    ea, total = c["epochs_anchor"], c["epochs_anchor"] + c["epochs_more"]
    bad = [e for e in c["trak_checkpoints"] if not 1 <= e <= total]
    if bad:
        errs.append(f"parameter 'trak_checkpoints' = {c['trak_checkpoints']!r}: epochs {bad} do not exist "
                    f"(the baseline trains epochs 1..{total} = epochs_anchor + epochs_more)")
    later = [e for e in c["trak_checkpoints"] if ea < e <= total]
    if later:
        errs.append(f"parameter 'trak_checkpoints' = {c['trak_checkpoints']!r}: epochs {later} come from "
                    f"continued ERM, not from the anchor (epochs 1..{ea} = epochs_anchor). TRAK must attribute "
                    f"the model D3M edits, the anchor; use anchor epochs, e.g. "
                    f"{list(range(max(1, ea - 2), ea + 1))}")
    if c["d3m_selection"] == "k_lowest" and c["d3m_k"] is None:
        errs.append("parameter 'd3m_k' must be set when d3m_selection is 'k_lowest'")
    from . import methods as methods_mod

    dataset = "synthetic" if c["dataset"] == "mimic" and c["synthetic"] else c["dataset"]
    if c["methods"] is not None:
        errs.extend(methods_mod.validate(c["methods"], dataset, has_ground_truth=True,
                                         group_labels=c["group_labels"]))
    run_arms = ["erm", *methods_mod.for_data(c["methods"], dataset, c["group_labels"])]
    absent = [m for m in c["primary_contrast"] if m not in run_arms]
    if absent:
        errs.append(f"parameter 'primary_contrast' = {c['primary_contrast']!r}: arm(s) {absent} are not among "
                    f"this run's arms ({', '.join(run_arms)}); add them to `methods` or choose another contrast")
    if c["dataset"] == "mimic" and not c["synthetic"]:
        for k in ("mimic_cxr_dir", "mimic_iv_dir"):
            if c[k] is None:
                errs.append(f"parameter {k!r} must be set for real MIMIC (synthetic is false)")
            elif not Path(c[k]).is_dir():
                errs.append(f"parameter {k!r} = {c[k]!r}: no such folder")
    if c["dataset"] == "nih":
        if c["nih_dir"] is None:
            errs.append("parameter 'nih_dir' must be set when dataset is 'nih'")
        elif not Path(c["nih_dir"]).is_dir():
            errs.append(f"parameter 'nih_dir' = {c['nih_dir']!r}: no such folder")
    if c["pretrained"] == "imagenet":   # torchvision's ImageNet ResNet-50: a local file, or a download
        from .models import imagenet_problem

        problem = imagenet_problem(c["arch"])
        if problem:
            errs.append(problem)
    for k in ("pretrained", "synthetic_ground_truth"):
        if c[k] is not None and not (k == "pretrained" and c[k] == "imagenet") and not Path(c[k]).is_file():
            errs.append(f"parameter {k!r} = {c[k]!r}: no such file")
    if c["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            errs.append("parameter 'device' = 'cuda' but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    return errs


def _absolute(name: str, value: Any, base: Path | None) -> Any:
    if (name in PATH_PARAMS and isinstance(value, str) and base is not None and not os.path.isabs(value)
            and not (name == "pretrained" and value == "imagenet")):
        return str((base / value).resolve())
    return value


@dataclass(frozen=True)
class Config:
    """A complete, checked configuration: ``cfg.lr``, ``cfg["lr"]``, ``cfg.for_stage("04_trak")``."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self.values)))

    def for_stage(self, stage: str, kind: str | None = "stage") -> dict[str, Any]:
        """The parameters ``stage`` reads (``kind=None``: view parameters too)."""
        return {p.name: self.values[p.name] for p in PARAMS
                if stage in p.stages and (kind is None or p.kind == kind)}

    def diff(self, other: "Config | Mapping[str, Any]") -> dict[str, tuple[Any, Any]]:
        """``{name: (other's value, this value)}`` where they differ."""
        o = other.values if isinstance(other, Config) else other
        return {k: (o.get(k), v) for k, v in self.values.items() if o.get(k) != v}

    def with_overrides(self, overrides: Mapping[str, Any], base: Path | None = None) -> "Config":
        return resolve({**self.values, **overrides}, base=base)

    def table(self, names: Iterable[str] | None = None):
        """A two-column table (parameter, value) with the help line, for the notebooks."""
        import pandas as pd

        names = list(names) if names is not None else [p.name for p in PARAMS]
        return pd.DataFrame({"parameter": names, "value": [repr(self.values[n]) for n in names],
                             "meaning": [BY_NAME[n].help for n in names]})


def defaults() -> dict[str, Any]:
    return {p.name: json.loads(json.dumps(p.default)) for p in PARAMS}


def resolve(values: Mapping[str, Any], base: Path | None = None) -> Config:
    """Defaults, then ``values``; every name and value checked, all problems reported at once."""
    check_names(values)
    merged = defaults()
    errs = []
    for k, v in values.items():
        if k == "run_dir":
            continue
        try:
            merged[k] = _absolute(k, check_value(k, v), base)
        except ConfigError as exc:
            errs.append(str(exc))
    if not errs:
        errs = _check_combination(merged, base)
    if errs:
        raise ConfigError("\n".join(errs))
    return Config(merged)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping."""


def _no_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"parameter {key!r} is given twice (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A flat YAML mapping of parameters; duplicate keys and unknown names are errors."""
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"parameter file {f} does not exist")
    try:
        loaded = yaml.load(f.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{f}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameter file {f} is not valid YAML: {exc}") from exc
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError(f"parameter file {f} must hold a mapping of name: value")
    check_names(loaded, where=str(f))
    return loaded


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["seeds=[0, 1]", "lr=0.1"]`` -> ``{"seeds": [0, 1], "lr": 0.1}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"-p expects name=value, got {item!r}")
        if name in out:   # the last would win silently
            raise ConfigError(f"-p {name} is given twice ({name}={out[name]!r} and {item!r}); give it once")
        try:
            out[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"-p {name}: value {value!r} is not valid YAML ({exc})") from exc
    return out


def describe() -> str:
    """Every parameter with its default, allowed values, stages and help (``python -m d3m_lib params``)."""
    lines = []
    for p in PARAMS:
        allowed = f" [{' | '.join(map(str, p.choices))}]" if p.choices else f" ({p.type})"
        lines.append(f"{p.name} = {p.default!r}{allowed}\n    {p.help}; read by {', '.join(p.stages)}"
                     + (" (display only)" if p.kind == "view" else ""))
    return "\n".join(lines)
