"""MIMIC-IV race strings -> groups, and the per-patient rule."""

import pandas as pd
import pytest

from d3m_lib import race
from d3m_lib.constants import RACE_GROUPS

EXPECTED = {
    "White": ["WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - EASTERN EUROPEAN",
              "WHITE - BRAZILIAN", "PORTUGUESE"],
    "Black or African American": ["BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN",
                                  "BLACK/CARIBBEAN ISLAND", "BLACK/AFRICAN"],
    "Hispanic/Latino": ["HISPANIC/LATINO - PUERTO RICAN", "HISPANIC/LATINO - DOMINICAN",
                        "HISPANIC/LATINO - GUATEMALAN", "HISPANIC/LATINO - SALVADORAN",
                        "HISPANIC/LATINO - MEXICAN", "HISPANIC/LATINO - COLUMBIAN",
                        "HISPANIC/LATINO - HONDURAN", "HISPANIC/LATINO - CUBAN",
                        "HISPANIC/LATINO - CENTRAL AMERICAN", "HISPANIC OR LATINO", "SOUTH AMERICAN"],
    "Asian": ["ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN",
              "ASIAN - KOREAN"],
    "Other": ["AMERICAN INDIAN/ALASKA NATIVE", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER",
              "MULTIPLE RACE/ETHNICITY", "OTHER"],
    "Unknown": ["UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER"],
}


def test_all_33_strings_map_to_the_expected_group():
    flat = {s: g for g, ss in EXPECTED.items() for s in ss}
    assert len(flat) == 33
    assert set(race.MIMIC_RACE_STRINGS) == set(flat)
    for s, g in flat.items():
        assert race.map_race(s) == g
    assert set(race.RACE_TO_GROUP.values()) == set(RACE_GROUPS)


def test_shares_give_the_documented_group_mix():
    tot = {g: sum(race.RACE_SHARES_PER_MILLE[s] for s in ss) / 1000 for g, ss in EXPECTED.items()}
    assert tot["White"] == pytest.approx(0.66, abs=0.01)
    assert tot["Black or African American"] == pytest.approx(0.14, abs=0.01)
    assert tot["Hispanic/Latino"] == pytest.approx(0.06, abs=0.01)
    assert tot["Asian"] == pytest.approx(0.04, abs=0.01)
    assert tot["Unknown"] == pytest.approx(0.06, abs=0.01)


def test_unknown_string_is_named():
    with pytest.raises(ValueError, match="'WHITE-IRISH'.*admissions.csv.gz"):
        race.map_race("WHITE-IRISH", where="admissions.csv.gz")
    with pytest.raises(ValueError, match="'white'"):
        race.map_race("white")


def _adm(rows):
    return pd.DataFrame(rows, columns=["subject_id", "hadm_id", "race", "admittime"])


def test_unknown_string_in_file_names_file_column_and_strings():
    adm = _adm([(1, 10, "WHITE", "2180-01-01 10:00:00"), (2, 11, "MARTIAN", "2180-01-01 10:00:00"),
                (3, 12, "VENUSIAN", "2180-01-01 10:00:00")])
    with pytest.raises(ValueError) as e:
        race.patient_race(adm, source="hosp/admissions.csv.gz")
    msg = str(e.value)
    assert "hosp/admissions.csv.gz" in msg and "'race'" in msg
    assert "MARTIAN" in msg and "VENUSIAN" in msg and "2 row(s)" in msg


ADM = _adm([
    # 1: consistent (two White strings) with an UNKNOWN admission ignored
    (1, 100, "WHITE", "2180-01-01 10:00:00"), (1, 101, "WHITE - RUSSIAN", "2181-01-01 10:00:00"),
    (1, 102, "UNKNOWN", "2182-01-01 10:00:00"),
    # 2: only unknown-type strings
    (2, 200, "UNABLE TO OBTAIN", "2180-01-01 10:00:00"), (2, 201, "PATIENT DECLINED TO ANSWER", "2181-01-01 10:00:00"),
    # 3: majority Black (2 vs 1), the minority group is the most recent
    (3, 300, "BLACK/AFRICAN AMERICAN", "2180-01-01 10:00:00"), (3, 301, "BLACK/CAPE VERDEAN", "2181-01-01 10:00:00"),
    (3, 302, "WHITE", "2182-01-01 10:00:00"),
    # 4: tie Asian vs Hispanic, Asian most recent (rows deliberately out of order)
    (4, 401, "ASIAN - KOREAN", "2185-06-01 10:00:00"), (4, 400, "SOUTH AMERICAN", "2184-01-01 10:00:00"),
    # 5: blank race cell counts as Unknown
    (5, 500, None, "2180-01-01 10:00:00"),
])


def _by_subject(df):
    return df.set_index("subject_id")


def test_rule_mode_recent_each_branch():
    out = _by_subject(race.patient_race(ADM))
    assert list(out.columns) == ["group", "race_rule", "n_admissions", "n_distinct_groups"]
    assert out.loc[1, ["group", "race_rule", "n_admissions", "n_distinct_groups"]].tolist() == \
        ["White", "consistent", 3, 1]
    assert out.loc[2, ["group", "race_rule", "n_distinct_groups"]].tolist() == ["Unknown", "all_unknown", 0]
    assert out.loc[3, ["group", "race_rule", "n_distinct_groups"]].tolist() == \
        ["Black or African American", "majority", 2]
    assert out.loc[4, ["group", "race_rule"]].tolist() == ["Asian", "tie_most_recent"]
    assert out.loc[5, ["group", "race_rule"]].tolist() == ["Unknown", "all_unknown"]


def test_tie_goes_to_most_recent_admission():
    adm = ADM.copy()
    adm.loc[adm["hadm_id"] == 400, "admittime"] = "2186-01-01 10:00:00"
    assert _by_subject(race.patient_race(adm)).loc[4, "group"] == "Hispanic/Latino"


def test_rule_unknown_if_conflict_and_most_recent():
    out = _by_subject(race.patient_race(ADM, rule="unknown_if_conflict"))
    assert out.loc[1, "group"] == "White"
    assert out.loc[3, ["group", "race_rule"]].tolist() == ["Unknown", "conflict_unknown"]
    assert out.loc[4, ["group", "race_rule"]].tolist() == ["Unknown", "conflict_unknown"]
    out = _by_subject(race.patient_race(ADM, rule="most_recent"))
    assert out.loc[3, ["group", "race_rule"]].tolist() == ["White", "most_recent"]
    assert out.loc[4, "group"] == "Asian"
    with pytest.raises(ValueError, match="rule='vote'"):
        race.patient_race(ADM, rule="vote")


def test_missing_columns_and_bad_dates_are_named():
    with pytest.raises(ValueError, match="admittime"):
        race.patient_race(ADM.drop(columns="admittime"), source="x.csv")
    bad = ADM.copy()
    bad.loc[0, "admittime"] = "not a date"
    with pytest.raises(ValueError, match="x.csv, column 'admittime': 1 row"):
        race.patient_race(bad, source="x.csv")


def test_subjects_without_admission_unknown_or_excluded():
    out = _by_subject(race.race_for_subjects([1, 3, 99], ADM))
    assert list(out.index) == [1, 3, 99]
    assert out.loc[99, ["group", "race_rule", "n_admissions"]].tolist() == ["Unknown", "no_admission", 0]
    ex = _by_subject(race.race_for_subjects([1, 99], ADM, missing="exclude"))
    assert pd.isna(ex.loc[99, "group"]) and ex.loc[99, "race_rule"] == "no_admission"
    assert ex.loc[1, "group"] == "White"
    with pytest.raises(ValueError, match="missing='drop'"):
        race.race_for_subjects([1], ADM, missing="drop")
