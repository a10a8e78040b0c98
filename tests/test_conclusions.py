"""conclusions: claims only where the paired interval excludes 0; shares only of a reliable gain; group nouns."""

import math

import pandas as pd

from d3m_lib import conclusions as c


def test_paired_sentence_claims_only_when_the_interval_excludes_zero():
    s = c.paired_sentence("d3m", "random", 0.031, 0.004, 0.058, finding="Edema")
    assert s.startswith("Edema: D3M − random") and "+0.031 [0.004, 0.058]" in s
    assert "excludes 0" in s and "D3M is better than random" in s
    s = c.paired_sentence("d3m", "erm", -0.02, -0.05, 0.01)
    assert "includes 0" in s and "not reliable" in s and "better" not in s and "worse" not in s
    s = c.paired_sentence("d3m", "erm", 0.02, 0.01, 0.03, metric="fnr")
    assert "D3M is worse than ERM" in s  # a higher false negative rate is worse
    assert "no difference is claimed" in c.paired_sentence("d3m", "erm", 0.1, math.nan, math.nan)


def test_paired_sentences_from_a_table():
    t = pd.DataFrame({"finding": ["F", "F"], "a": ["d3m", "oracle"], "b": ["random", "erm"],
                      "diff": [0.0, 0.1], "lo": [0.0, 0.05], "hi": [0.0, 0.15]})
    out = c.paired_sentences(t)
    assert "includes 0" in out[0] and "+0.000 [0.000, 0.000]" in out[0]  # a zero-width interval at 0
    assert "oracle is better than ERM" in out[1]


def test_recovery_sentence():
    s = c.recovery_sentence(0.42, 0.10, 0.75, 0.08, 0.03, 0.13)
    assert "D3M recovers 42% [10%, 75%] of the oracle's gain in worst-group accuracy over ERM" in s
    s = c.recovery_sentence(math.nan, math.nan, math.nan, 0.01, -0.02, 0.04)
    assert "no share is stated" in s and "recovers" not in s


def test_readings_and_nouns():
    assert c.interval_reading(0.01, 0.2) == "lies entirely above zero"
    assert c.interval_reading(-0.2, -0.01) == "lies entirely below zero"
    assert c.interval_reading(-0.1, 0.1) == "includes zero"
    assert not c.excludes_zero(0.0, 0.1) and c.excludes_zero(-0.3, -0.1)
    assert c.group_noun("mimic") == "race" and c.group_noun("nih", "sex") == "sex"
    assert c.group_noun("nih", "age_band") == "age band"
    s = c.worst_group_sentence("Female", 0.71, 0.66, 0.76, noun=c.group_noun("nih", "sex"))
    assert s == "the worst sex group of ERM is Female, with accuracy 0.710 [0.660, 0.760]."
    assert c.interval_text(-0.0001, -0.001, 0.001) == "0.000 [-0.001, 0.001]"
