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


def test_change_sentence_claims_only_outside_zero():
    s = c.change_sentence("d3m", "erm", "Asian", 0.05, 0.01, 0.09, noun="sex", finding="Edema")
    assert s.startswith("Edema: D3M − ERM in accuracy on ERM's worst sex group (Asian): +0.050 [0.010, 0.090]")
    assert "excludes 0" in s and "improved" in s
    s = c.change_sentence("d3m", "erm", "Asian", 0.05, -0.01, 0.09)
    assert "includes 0" in s and "no change is claimed" in s and "improved" not in s
    assert "not available" in c.change_sentence("d3m", "erm", "A", 0.05, math.nan, math.nan)
    assert "worsened" in c.change_sentence("d3m", "erm", "A", 0.05, 0.01, 0.09, metric="fnr")


def test_leader_sentence_names_reliable_and_unreliable_rivals():
    paired = pd.DataFrame({"a": ["d3m", "d3m", "d3m"], "b": ["erm", "random", "balanced"],
                           "diff": [0.1, 0.02, 0.08], "lo": [0.05, -0.01, 0.01], "hi": [0.15, 0.05, 0.12]})
    s = c.leader_sentence("d3m", 0.7, 0.6, 0.8, paired)
    assert s.startswith("The highest point estimate of worst-group accuracy is D3M's, 0.700 [0.600, 0.800].")
    assert "excludes 0 against ERM, group-balanced." in s
    assert "Against random the paired interval includes 0, so D3M is not reliably better than it." in s
    assert "nothing is compared" in c.leader_sentence("erm", 0.5, 0.4, 0.6, paired.iloc[:0], finding="F")


def test_recovery_sentences_and_no_ceiling():
    rec = pd.DataFrame({"finding": ["F", "F"], "method": ["d3m", "random"], "share": [0.5, math.nan],
                        "lo": [0.2, math.nan], "hi": [0.8, math.nan], "gain": [0.1, 0.01],
                        "gain_lo": [0.05, -0.02], "gain_hi": [0.15, 0.04]})
    out = c.recovery_sentences(rec)
    assert out[0].startswith("F: D3M recovers 50% [20%, 80%]") and "no share is stated" in out[1]
    flat = rec.assign(share=math.nan, gain=0.01, gain_lo=-0.02, gain_hi=0.04)
    one = c.recovery_sentences(flat)
    assert len(one) == 1 and "for any arm (D3M, random) to recover" in one[0] and one[0].startswith("F: ")
    assert "Real data" in c.no_ceiling_sentence(synthetic=False)
    assert "add 'oracle'" in c.no_ceiling_sentence()


def test_planted_sentence_claims_enrichment_only_in_every_seed():
    s = c.planted_sentence("d3m", "label_flip", 0.3, 0.2, 0.4, 0.05, 0.5, 3)
    assert s.startswith("D3M's removals were label flip images at a rate of 0.300 (seeds 0.200 to 0.400)")
    assert "In every seed its precision exceeds the base rate." in s
    s = c.planted_sentence("random", "shortcut", 0.06, 0.01, 0.1, 0.05, 0.1, 3)
    assert s.startswith("Random's") and "no enrichment is claimed" in s and "exceeds" not in s
    assert "below the base rate" in c.planted_sentence("random", "shortcut", 0.01, 0.0, 0.02, 0.05, 0.1, 1)
    assert "undefined" in c.planted_sentence("d3m", "shortcut", math.nan, math.nan, math.nan, 0.05, 0.0, 2)
    assert "plants none" in c.planted_sentence("d3m", "shortcut", 0.0, 0.0, 0.0, 0.0, math.nan, 3)


def test_removal_sentence():
    s = c.removal_sentence("d3m", "Asian", 0.25, 0.1, noun="race")
    assert s == ("D3M removed 25.0% of the race group Asian's training images, the highest rate of any group "
                 "(all groups: 10.0%).")


def test_targeting_sentence_reads_the_equal_weight_row():
    from d3m_lib import conclusions

    w = pd.DataFrame({"weighting": ["softmax", "softmax"], "beta": [0.0, 1.0], "changed": [0.1, 0.0]})
    gl = pd.DataFrame({"seed": [0, 0, 1, 1], "group": ["A", "B", "A", "B"], "loss": [0.9, 0.3, 0.8, 0.2],
                       "weight": [0.6, 0.4, 0.65, 0.35]})
    s = conclusions.targeting_sentence(w, gl, "softmax", 1.0)
    assert "(A, 2 of 2 seeds) gets weight 0.62" in s and "equal weights: 0.50" in s
    assert "10% of the images" in s and "barely targets" in s
    assert "moves the selection" in conclusions.targeting_sentence(w.assign(changed=[0.4, 0.0]), gl, "softmax", 1.0)


def test_group_choice_sentence_names_the_choice_with_the_higher_precision():
    from d3m_lib import conclusions

    w = pd.DataFrame({"groups": ["race", "race_x_label"] * 2, "weighting": "softmax", "beta": 1.0,
                      "precision": [0.2, 0.1, 0.3, 0.1], "recall": [0.3, 0.2, 0.4, 0.2]})
    s = conclusions.group_choice_sentence(w, "race", "softmax", 1.0)
    assert "race groups put planted images among the removed at precision 0.250 (recall 0.350)" in s
    assert "race × label groups at 0.100 (0.200)" in s and "are this run's choice" in s
    assert "but this run weighs race × label groups" in conclusions.group_choice_sentence(
        w, "race_x_label", "softmax", 1.0)
