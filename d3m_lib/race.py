"""MIMIC-IV race strings -> the source study's six groups, and one group per patient.

MIMIC-IV records race per *admission* (``hosp/admissions.csv.gz``, column
``race``, 33 distinct strings). The study needs one group per *patient*, so
this module (1) maps every string to one of ``constants.RACE_GROUPS`` and
(2) reduces a patient's admissions to one group by a documented rule.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from .constants import RACE_GROUPS

# The 33 strings of MIMIC-IV ``admissions.race`` -> the study's six groups.
# Decisions that are not spelled out by the string itself:
#   - SOUTH AMERICAN -> Hispanic/Latino: the US OMB definition of Hispanic or
#     Latino names "South or Central American ... origin".
#   - PORTUGUESE -> White: the OMB definition of Hispanic is "Spanish culture or
#     origin", which excludes Portugal; OMB's White includes "original peoples
#     of Europe". WHITE - BRAZILIAN is White because MIMIC says so.
#   - AMERICAN INDIAN/ALASKA NATIVE, NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER,
#     MULTIPLE RACE/ETHNICITY and OTHER -> Other: the study has no separate
#     group for them (each is well under 1% of admissions).
#   - UNKNOWN, UNABLE TO OBTAIN, PATIENT DECLINED TO ANSWER -> Unknown.
RACE_TO_GROUP: dict[str, str] = {
    "WHITE": "White",
    "WHITE - OTHER EUROPEAN": "White",
    "WHITE - RUSSIAN": "White",
    "WHITE - EASTERN EUROPEAN": "White",
    "WHITE - BRAZILIAN": "White",
    "PORTUGUESE": "White",
    "BLACK/AFRICAN AMERICAN": "Black or African American",
    "BLACK/CAPE VERDEAN": "Black or African American",
    "BLACK/CARIBBEAN ISLAND": "Black or African American",
    "BLACK/AFRICAN": "Black or African American",
    "HISPANIC/LATINO - PUERTO RICAN": "Hispanic/Latino",
    "HISPANIC/LATINO - DOMINICAN": "Hispanic/Latino",
    "HISPANIC/LATINO - GUATEMALAN": "Hispanic/Latino",
    "HISPANIC/LATINO - SALVADORAN": "Hispanic/Latino",
    "HISPANIC/LATINO - MEXICAN": "Hispanic/Latino",
    "HISPANIC/LATINO - COLUMBIAN": "Hispanic/Latino",
    "HISPANIC/LATINO - HONDURAN": "Hispanic/Latino",
    "HISPANIC/LATINO - CUBAN": "Hispanic/Latino",
    "HISPANIC/LATINO - CENTRAL AMERICAN": "Hispanic/Latino",
    "HISPANIC OR LATINO": "Hispanic/Latino",
    "SOUTH AMERICAN": "Hispanic/Latino",
    "ASIAN": "Asian",
    "ASIAN - CHINESE": "Asian",
    "ASIAN - SOUTH EAST ASIAN": "Asian",
    "ASIAN - ASIAN INDIAN": "Asian",
    "ASIAN - KOREAN": "Asian",
    "AMERICAN INDIAN/ALASKA NATIVE": "Other",
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER": "Other",
    "MULTIPLE RACE/ETHNICITY": "Other",
    "OTHER": "Other",
    "UNKNOWN": "Unknown",
    "UNABLE TO OBTAIN": "Unknown",
    "PATIENT DECLINED TO ANSWER": "Unknown",
}

MIMIC_RACE_STRINGS: tuple[str, ...] = tuple(RACE_TO_GROUP)

# Approximate share of MIMIC-IV admissions carrying each string (per mille).
# Rounded from public descriptive summaries of MIMIC-IV v2 ``admissions.race``;
# used only by the synthetic generator so that its cohort looks like MIMIC's.
# Group totals: White 66%, Black 14%, Hispanic/Latino 6%, Asian 4%, Other 4%,
# Unknown 6% (the weights sum to 1000).
RACE_SHARES_PER_MILLE: dict[str, float] = {
    "WHITE": 607.0,
    "WHITE - OTHER EUROPEAN": 24.0,
    "WHITE - RUSSIAN": 9.0,
    "WHITE - EASTERN EUROPEAN": 4.0,
    "WHITE - BRAZILIAN": 3.0,
    "PORTUGUESE": 13.0,
    "BLACK/AFRICAN AMERICAN": 117.0,
    "BLACK/CAPE VERDEAN": 11.0,
    "BLACK/CARIBBEAN ISLAND": 7.0,
    "BLACK/AFRICAN": 5.0,
    "HISPANIC/LATINO - PUERTO RICAN": 25.0,
    "HISPANIC/LATINO - DOMINICAN": 16.0,
    "HISPANIC/LATINO - GUATEMALAN": 4.0,
    "HISPANIC/LATINO - SALVADORAN": 3.0,
    "HISPANIC/LATINO - MEXICAN": 2.0,
    "HISPANIC/LATINO - COLUMBIAN": 1.5,
    "HISPANIC/LATINO - HONDURAN": 1.0,
    "HISPANIC/LATINO - CUBAN": 1.0,
    "HISPANIC/LATINO - CENTRAL AMERICAN": 1.0,
    "HISPANIC OR LATINO": 3.5,
    "SOUTH AMERICAN": 2.0,
    "ASIAN": 15.0,
    "ASIAN - CHINESE": 15.0,
    "ASIAN - SOUTH EAST ASIAN": 4.0,
    "ASIAN - ASIAN INDIAN": 4.0,
    "ASIAN - KOREAN": 2.0,
    "AMERICAN INDIAN/ALASKA NATIVE": 3.0,
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER": 1.5,
    "MULTIPLE RACE/ETHNICITY": 2.5,
    "OTHER": 33.0,
    "UNKNOWN": 35.0,
    "UNABLE TO OBTAIN": 14.0,
    "PATIENT DECLINED TO ANSWER": 11.0,
}

UNKNOWN_GROUP = "Unknown"

# The per-patient rules ``patient_race`` offers (the first is the default).
PATIENT_RULES = ("mode_recent", "unknown_if_conflict", "most_recent")

# What to do with a patient who has images but no MIMIC-IV admission:
# "unknown" -> group Unknown (default), "exclude" -> group <NA>, to be dropped
# and counted by the caller.
MISSING_POLICIES = ("unknown", "exclude")


def map_race(s: str, where: str = "") -> str:
    """The study group of one MIMIC-IV race string; ValueError if the string is not one of the 33.

    ``where`` (e.g. ``"admissions.csv.gz, column 'race'"``) is added to the error message.
    """
    try:
        return RACE_TO_GROUP[s]
    except (KeyError, TypeError):
        loc = f" in {where}" if where else ""
        raise ValueError(
            f"unknown race string {s!r}{loc}; expected one of the {len(RACE_TO_GROUP)} MIMIC-IV "
            f"strings in d3m_lib.race.MIMIC_RACE_STRINGS") from None


def map_race_column(race: pd.Series, where: str = "") -> pd.Series:
    """Map a column of race strings to groups; blank cells -> Unknown.

    Raises ValueError listing every string that is not one of the 33 (with ``where``).
    """
    s = race.astype("object")
    known = s.isna() | s.isin(list(RACE_TO_GROUP))
    if not known.all():
        bad = sorted(map(str, pd.unique(s[~known])))
        loc = f" in {where}" if where else ""
        raise ValueError(
            f"{(~known).sum()} row(s){loc} hold race strings that are not MIMIC-IV race strings: "
            f"{bad}; extend d3m_lib.race.RACE_TO_GROUP if your MIMIC-IV version added them")
    return s.map(RACE_TO_GROUP).fillna(UNKNOWN_GROUP).astype(str)


def patient_race(admissions: pd.DataFrame, source: str = "admissions.csv.gz",
                 rule: str = "mode_recent") -> pd.DataFrame:
    """One race group per patient from their admissions.

    Each admission's ``race`` string is mapped to a group (``map_race``; a blank
    cell counts as Unknown). Admissions in the Unknown group are ignored when the
    patient has at least one admission with a known group, because "unknown",
    "unable to obtain" and "declined" say nothing against a recorded race.
    Then, by ``rule``:

    - ``"mode_recent"`` (default): the group recorded on most of the patient's
      known admissions; a tie goes to the tied group of the most recent
      admission (by ``admittime``, then ``hadm_id``). Self-reported race is
      occasionally re-recorded differently at a later visit; the majority is the
      most stable reading, and keeps every patient in the analysis (as the source
      study and Gichoya et al. keep one label per patient).
    - ``"unknown_if_conflict"``: a patient whose known admissions disagree is put
      in Unknown (conservative: no guess about conflicting records).
    - ``"most_recent"``: the group of the most recent known admission.

    Returns one row per ``subject_id`` with columns ``subject_id``, ``group``,
    ``race_rule`` (which branch decided: ``all_unknown``, ``consistent``,
    ``majority``, ``tie_most_recent``, ``conflict_unknown``, ``most_recent``),
    ``n_admissions`` (all admissions) and ``n_distinct_groups`` (distinct known
    groups). Needs columns ``subject_id``, ``race`` and, for the rules that look
    at time, ``admittime`` (and ``hadm_id`` if present). A string that is not
    one of the 33 raises ValueError naming ``source`` and the column.
    """
    if rule not in PATIENT_RULES:
        raise ValueError(f"rule={rule!r}: expected one of {PATIENT_RULES}")
    need = ["subject_id", "race", "admittime"]
    missing = [c for c in need if c not in admissions.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing} needed for the patient race rule")
    adm = pd.DataFrame({
        "subject_id": admissions["subject_id"].to_numpy(),
        "group": map_race_column(admissions["race"], f"{source}, column 'race'").to_numpy(),
        "t": pd.to_datetime(admissions["admittime"], errors="coerce", format="ISO8601").to_numpy(),
        "hadm": (admissions["hadm_id"].to_numpy() if "hadm_id" in admissions.columns
                 else np.arange(len(admissions))),
    })
    if adm["t"].isna().any():
        n = int(adm["t"].isna().sum())
        raise ValueError(f"{source}, column 'admittime': {n} row(s) are blank or not dates")
    # Most recent last, so the last row of a (subject, group) is its latest admission.
    adm = adm.sort_values(["subject_id", "t", "hadm"], kind="mergesort")
    n_adm = adm.groupby("subject_id", sort=True).size().rename("n_admissions")
    known = adm[adm["group"] != UNKNOWN_GROUP]
    stats = known.groupby(["subject_id", "group"], sort=True).agg(
        count=("t", "size"), last_t=("t", "max"), last_h=("hadm", "max")).reset_index()
    latest = known.groupby("subject_id", sort=True).tail(1).set_index("subject_id")["group"]

    # one pass per rule, vectorised over patients (MIMIC: 65,000 patients, 450,000 admissions)
    n_groups = stats.groupby("subject_id", sort=True).size()
    # per patient: most admissions, then latest admission (time, then hadm_id) last
    best = stats.sort_values(["subject_id", "count", "last_t", "last_h"], kind="mergesort") \
        .groupby("subject_id", sort=True).tail(1).set_index("subject_id")
    top_count = stats.groupby("subject_id", sort=True)["count"].transform("max")
    n_top = (stats["count"] == top_count).groupby(stats["subject_id"], sort=True).sum()
    out = pd.DataFrame({"subject_id": n_groups.index, "n_distinct_groups": n_groups.to_numpy()})
    single = out["n_distinct_groups"].to_numpy() == 1
    if rule == "unknown_if_conflict":
        group = np.where(single, best["group"].to_numpy(), UNKNOWN_GROUP)
        why = np.where(single, "consistent", "conflict_unknown")
    elif rule == "most_recent":
        group = np.where(single, best["group"].to_numpy(), latest.loc[n_groups.index].to_numpy())
        why = np.where(single, "consistent", "most_recent")
    else:
        group = best["group"].to_numpy()
        why = np.where(single, "consistent",
                       np.where(n_top.loc[n_groups.index].to_numpy() == 1, "majority", "tie_most_recent"))
    out["group"], out["race_rule"] = group, why
    out = out[["subject_id", "group", "race_rule", "n_distinct_groups"]]
    unknown_only = n_adm.index.difference(pd.Index(out["subject_id"]))
    out = pd.concat([out, pd.DataFrame({
        "subject_id": unknown_only, "group": UNKNOWN_GROUP, "race_rule": "all_unknown",
        "n_distinct_groups": 0})], ignore_index=True)
    out["n_admissions"] = out["subject_id"].map(n_adm).astype(int)
    out = out.sort_values("subject_id", kind="mergesort").reset_index(drop=True)
    return out[["subject_id", "group", "race_rule", "n_admissions", "n_distinct_groups"]]


def race_for_subjects(subject_ids: Iterable, admissions: pd.DataFrame,
                      source: str = "admissions.csv.gz", rule: str = "mode_recent",
                      missing: str = "unknown") -> pd.DataFrame:
    """``patient_race`` for exactly the given subjects, including those without admissions.

    A subject with no admission gets ``race_rule = "no_admission"``,
    ``n_admissions = 0`` and group ``Unknown`` (``missing="unknown"``, default:
    race was never recorded, which is what Unknown means) or ``<NA>``
    (``missing="exclude"``: the caller drops those rows and counts them in its
    flow table). Admissions of subjects not asked for are ignored.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: expected one of {MISSING_POLICIES}")
    ids = pd.Index(pd.unique(pd.Series(list(subject_ids))))
    adm = admissions[admissions["subject_id"].isin(ids)]
    per = patient_race(adm, source=source, rule=rule).set_index("subject_id")
    per = per.reindex(ids)
    absent = per["group"].isna()
    per["group"] = per["group"].astype("object")
    per.loc[absent, "group"] = UNKNOWN_GROUP if missing == "unknown" else pd.NA
    per.loc[absent, "race_rule"] = "no_admission"
    per.loc[absent, ["n_admissions", "n_distinct_groups"]] = 0
    per["n_admissions"] = per["n_admissions"].astype(int)
    per["n_distinct_groups"] = per["n_distinct_groups"].astype(int)
    per.index.name = "subject_id"
    return per.reset_index()


assert set(RACE_TO_GROUP.values()) == set(RACE_GROUPS)
assert len(MIMIC_RACE_STRINGS) == 33 and set(RACE_SHARES_PER_MILLE) == set(RACE_TO_GROUP)
assert abs(sum(RACE_SHARES_PER_MILLE.values()) - 1000.0) < 1e-9
