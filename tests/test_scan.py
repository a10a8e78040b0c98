"""scan: ranking by accuracy gap, eligibility, unavailable findings, choice of findings."""

import numpy as np
import pandas as pd
import pytest

from d3m_lib.scan import available_findings, choose_findings, label_counts, metric_matrix, rank_findings


def _scan(acc):
    """A scan table with the given per-group accuracies (and AUROC = accuracy)."""
    recs = []
    for f, per_group in acc.items():
        for g, v in {**per_group, "All": np.mean(list(per_group.values()))}.items():
            for m in ("accuracy", "auroc"):
                recs.append(dict(finding=f, group=g, metric=m, value=v, lo=v - .05, hi=v + .05,
                                 n=100, n_pos=30, note=""))
    return pd.DataFrame(recs)


def _counts(findings, groups, n=100, n_pos=30, low=None):
    recs = [dict(finding=f, split=s, group=g, n=n, n_pos=n_pos)
            for f in findings for s in ("train", "validate", "test") for g in groups]
    c = pd.DataFrame(recs)
    if low:
        f, s, g, pos = low
        c.loc[(c.finding == f) & (c.split == s) & (c.group == g), "n_pos"] = pos
    return c


def test_ranking_order_and_eligibility():
    acc = {"Edema": {"A": .90, "B": .80},          # gap .10
           "Cardiomegaly": {"A": .95, "B": .70},   # gap .25
           "Fracture": {"A": .99, "B": .50},       # gap .49 but too few positives
           "Pneumonia": {"A": .85, "B": .84}}      # gap .01
    counts = _counts(list(acc), ["A", "B"], low=("Fracture", "validate", "B", 2))
    r = rank_findings(_scan(acc), counts, min_group_n=20, min_group_pos=5,
                      unavailable={"Pleural Other": "unavailable: all labels missing"})
    assert r["finding"].tolist()[:3] == ["Cardiomegaly", "Edema", "Pneumonia"]
    assert r.set_index("finding").loc["Cardiomegaly", "gap_accuracy"] == pytest.approx(.25)
    assert r.set_index("finding").loc["Cardiomegaly", "worst_group"] == "B"
    assert r["rank"].tolist()[:3] == [1, 2, 3]
    fr = r.set_index("finding").loc["Fracture"]
    assert not fr["eligible"] and pd.isna(fr["rank"]) and "B/validate: 2 positives < 5" in fr["reason"]
    po = r.set_index("finding").loc["Pleural Other"]
    assert not po["available"] and "unavailable" in po["reason"]
    assert choose_findings(r, top_k=2) == ["Cardiomegaly", "Edema"]
    assert choose_findings(r, findings=["Pneumonia"]) == ["Pneumonia"]
    with pytest.warns(UserWarning, match="not eligible"):
        assert choose_findings(r, findings=["Fracture"]) == ["Fracture"]
    with pytest.raises(ValueError, match="cannot be studied"):
        choose_findings(r, findings=["Pleural Other"])
    with pytest.raises(ValueError, match="not one of the 14"):
        choose_findings(r, findings=["Cough"])
    m = metric_matrix(_scan(acc))
    assert list(m.columns) == ["A", "B", "All"] and m.loc["Edema", "B"] == pytest.approx(.8)


def test_available_findings_and_counts():
    cohort = pd.DataFrame({"split": ["train", "train", "validate", "test"], "group": ["A", "B", "A", "B"],
                           "Edema": [1.0, 0.0, 1.0, np.nan], "Fracture": np.nan, "Pneumonia": [1.0, 1.0, 0, 0]})
    avail, why = available_findings(cohort, ["Edema", "Fracture", "Pneumonia", "Cardiomegaly"])
    assert avail == ["Edema"]
    assert "all labels missing" in why["Fracture"] and "one of the two classes" in why["Pneumonia"]
    assert "no such column" in why["Cardiomegaly"]
    c = label_counts(cohort, ["Edema"])
    assert c[(c.split == "train") & (c.group == "A")]["n_pos"].iloc[0] == 1
    assert c["n"].sum() == 3  # the NaN label is not counted
