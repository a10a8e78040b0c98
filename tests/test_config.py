"""The one configuration: names, types, allowed values and combinations, checked up front."""

from __future__ import annotations

import pytest

from d3m_lib import config, rundir
from d3m_lib.config import ConfigError, resolve


def test_every_default_passes_its_own_checks_and_names_known_stages():
    cfg = resolve({})
    assert cfg.values == config.defaults()
    for p in config.PARAMS:
        assert set(p.stages) <= set(rundir.STAGES), p.name
        assert p.help and p.kind in ("stage", "view")


def test_each_parameter_is_listed_by_exactly_one_owning_notebook():
    owners = [n for s in rundir.STAGES for n in rundir.parameters_of(s)
              if config.BY_NAME[n].kind == "stage"]
    assert sorted(owners) == sorted(p.name for p in config.PARAMS if p.kind == "stage")


@pytest.mark.parametrize("values, message", [
    ({"seeds": "abc"}, "'seeds' = 'abc': must be a list of integers"),
    ({"seeds": [0, 0]}, "without repeats"),
    ({"seeds": [-1]}, "'seeds' = \\[-1\\]: every seed must be >= 0"),
    ({"synthetic_split": [0.5, 0.5]}, "three positive shares"),
    ({"synthetic_split": [0.5, 0.3, 0.3]}, "sum to 1"),
    ({"primary_contrast": ["d3m", "d3m"]}, "two different arms"),
    ({"primary_contrast": ["d3m", "oracel"]}, "did you mean 'oracle'"),
    ({"methods": ["d3m", "oracle"]}, "'primary_contrast' = \\['d3m', 'random'\\]: arm\\(s\\) \\['random'\\] are not"),
    ({"smallest_effect": 0}, "must be > 0"),
    ({"width": True}, "'width' = True: must be an integer"),
    ({"lr": 0}, "'lr' = 0: must be > 0"),
    ({"ci_level": 1.5}, "must be < 1"),
    ({"arch": "resnet18"}, "must be one of 'resnet9', 'resnet50'"),
    ({"credentialed": "yes"}, "must be one of True, False, 'auto'"),
    ({"findings": ["Cardiomegally"]}, "did you mean 'Cardiomegaly'"),
    ({"methods": ["randm"]}, "did you mean 'random'"),
    ({"methods": ["random"]}, "'random' removes as many images as 'd3m'"),
    ({"d3m_selection": "k_lowest"}, "'d3m_k' must be set"),
    ({"trak_checkpoints": [16]}, "epochs \\[16\\] do not exist"),
    ({"synthetic": False}, "'mimic_cxr_dir' must be set for real MIMIC"),
    ({"dataset": "nih"}, "'nih_dir' must be set"),
    ({"pretrained": "/no/such/file.pt"}, "no such file"),
    ({"n_boot": 5}, "must be >= 10"),
])
def test_bad_values_name_the_parameter_and_what_is_allowed(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve(values)


def test_pretrained_imagenet_is_refused_before_any_work_without_network_or_file(tmp_path, monkeypatch):
    from d3m_lib import models

    monkeypatch.setenv(models.OFFLINE_ENV, "1")          # never reach the network in tests
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(models.IMAGENET_ENV, raising=False)
    with pytest.raises(ConfigError, match="'pretrained' = 'imagenet': no local copy") as err:
        resolve({"arch": "resnet50", "pretrained": "imagenet"}, base=tmp_path)
    assert str(tmp_path / "hub" / "checkpoints" / models.IMAGENET_FILE) in str(err.value)
    with pytest.raises(ConfigError, match="'arch' is 'resnet9'"):
        resolve({"pretrained": "imagenet"})
    f = tmp_path / "hub" / "checkpoints" / models.IMAGENET_FILE
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")   # the check looks for the file only; it reads no weights
    cfg = resolve({"arch": "resnet50", "pretrained": "imagenet"}, base=tmp_path)
    assert cfg.pretrained == "imagenet"   # not turned into a path


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve({"seeds": "abc", "ci_level": 2.0})
    assert "seeds" in str(err.value) and "ci_level" in str(err.value)


def test_unknown_names_get_suggestions():
    with pytest.raises(ConfigError, match="trak_projdim \\(did you mean trak_proj_dim"):
        resolve({"trak_projdim": 64})


def test_ints_are_accepted_for_floats_and_paths_resolve_against_the_start_folder(tmp_path):
    (tmp_path / "cxr").mkdir()
    (tmp_path / "iv").mkdir()
    cfg = resolve({"lr": 1, "synthetic": False, "mimic_cxr_dir": "cxr", "mimic_iv_dir": "iv"}, base=tmp_path)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.mimic_cxr_dir == str(tmp_path / "cxr")


def test_params_file_refuses_duplicates_and_unknown_names(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("lr: 0.1\nseeds: [0]\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="'lr' is given twice \\(lines 1 and 3\\)"):
        config.read_params_file(f)
    f.write_text("lrate: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown parameter.*in {f}"):
        config.read_params_file(f)
    f.write_text("")
    assert config.read_params_file(f) == {}


def test_the_repository_params_files_are_valid(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("demo", "smoke"):
        resolve(config.read_params_file(root / "params" / f"{name}.yaml"), base=root)
    # real-data files need their folders; the names and types are still checked
    for name in ("mimic", "nih-sample", "lds"):
        f = root / "params" / f"{name}.yaml"
        if f.exists():
            values = config.read_params_file(f)
            for k, v in values.items():
                if config.BY_NAME[k].type != "path":
                    config.check_value(k, v)


def test_diff_and_for_stage():
    a = resolve({})
    b = a.with_overrides({"d3m_beta": 2.0, "publish_images": True})
    assert b.diff(a) == {"d3m_beta": (1.0, 2.0), "publish_images": (False, True)}
    assert "d3m_beta" in b.for_stage("05_d3m") and "publish_images" not in b.for_stage("06_per_race")
    assert "publish_images" in b.for_stage("06_per_race", kind=None)


def test_a_parameter_given_twice_with_p_is_refused():
    """A repeated -p NAME=... was silently the last one."""
    with pytest.raises(ConfigError, match=r"-p lr is given twice \(lr=0.1 and 'lr=0.2'\); give it once"):
        config.parse_overrides(["lr=0.1", "seeds=[0]", "lr=0.2"])


def test_the_null_scenario_survives_yaml():
    """YAML reads an unquoted `null` as None: for a parameter that cannot be null but has the choice
    'null' it means that choice, from a params file or from -p."""
    assert resolve(config.parse_overrides(["synthetic_scenario=null"])).synthetic_scenario == "null"
    assert resolve({"synthetic_scenario": "flips_only"}).synthetic_scenario == "flips_only"
    with pytest.raises(ConfigError, match="seeds"):
        resolve({"seeds": None})
