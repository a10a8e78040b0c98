"""privacy.py: the policy matrix, redaction, the output scanner, and notebooks 06/07 on a
fake run marked credentialed (nothing identifying may appear in their outputs)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from d3m_lib import plots  # noqa: E402
from d3m_lib.privacy import Policy, looks_like_xray, scan_notebook_outputs  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402


@pytest.mark.parametrize("dataset, synthetic, cred, ids, imgs, want_cred", [
    ("mimic", False, "auto", False, False, True),
    ("mimic", True, "auto", False, False, False),
    ("nih", False, "auto", False, False, False),
    ("mimic", True, True, False, False, True),
    ("mimic", False, False, False, False, False),
])
def test_policy_matrix(dataset, synthetic, cred, ids, imgs, want_cred):
    p = Policy.from_params(dataset, synthetic, cred, ids, imgs)
    assert p.credentialed is want_cred
    assert p.may_show_ids() is (not want_cred)
    assert p.may_show_images() is (not want_cred)


def test_publish_flags_open_only_what_they_name():
    p = Policy.from_params("mimic", False, "auto", publish_identifiers=True)
    assert p.may_show_ids() and not p.may_show_images()
    p = Policy.from_params("mimic", False, "auto", publish_images=True)
    assert p.may_show_images() and not p.may_show_ids()


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="credentialed"):
        Policy.from_params("mimic", False, "yes")
    with pytest.raises(ValueError, match="dataset"):
        Policy.from_params("chexpert", False)
    with pytest.raises(ValueError, match="publish_images"):
        Policy.from_params("mimic", False, publish_images="true")


def test_redact():
    df = pd.DataFrame({"image_id": ["a"], "subject_id": ["1"], "study_id": ["2"], "path": ["p"],
                       "group": ["White"], "prob": [0.3]}).set_index("image_id", append=True)
    red = Policy(True).redact(df)
    assert list(red.columns) == ["group", "prob"] and "image_id" not in red.index.names
    assert Policy(True, publish_identifiers=True).redact(df).equals(df)
    assert Policy(False).redact(df).equals(df)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _xray_grid_png() -> str:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    ims = [np.clip(80 + 100 * np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / 150) + rng.normal(0, 20, (32, 32)),
                   0, 255).astype(np.uint8) for _ in range(8)]
    return _png(plots.image_grid(ims, [f"y=1 s={i}" for i in range(8)], Policy(False), ncols=4))


def _chart_pngs() -> list[str]:
    forest = pd.DataFrame({"group": ["A", "B", "All"] * 2, "method": ["d3m"] * 3 + ["random"] * 3,
                           "change": [0.1, -0.05, 0.02, 0.0, 0.01, 0.0], "change_lo": [-0.1] * 6,
                           "change_hi": [0.2] * 6, "n": [10, 20, 30] * 2})
    wga = pd.DataFrame({"finding": ["F", "F"], "method": ["erm", "d3m"], "wga": [0.6, 0.7], "lo": [0.5, 0.6],
                        "hi": [0.7, 0.8]})
    ph = plots.image_grid([np.zeros((8, 8), np.uint8)], ["x"], Policy(True))
    return [_png(plots.forest_plot(forest)), _png(plots.wga_bars(wga)), _png(ph)]


def test_image_heuristic_separates_xrays_from_charts():
    assert looks_like_xray(base64.b64decode(_xray_grid_png()))
    for png in _chart_pngs():
        assert not looks_like_xray(base64.b64decode(png))


def _notebook(tmp_path, name, outputs, markdown=""):
    nb = nbformat.v4.new_notebook()
    if markdown:
        nb.cells.append(nbformat.v4.new_markdown_cell(markdown))
    c = nbformat.v4.new_code_cell("x")
    c.outputs = outputs
    nb.cells.append(c)
    d = tmp_path / "executed"
    d.mkdir(exist_ok=True)
    nbformat.write(nb, d / name)
    return d


COHORT = pd.DataFrame({"image_id": ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"],
                       "subject_id": ["10000032"], "study_id": ["50414267"], "row": [0]})


def test_scanner_finds_planted_ids(tmp_path):
    outs = [nbformat.v4.new_output("stream", name="stdout", text="see files/p10/p10000032/s1.jpg\n"),
            nbformat.v4.new_output("display_data", data={
                "text/html": "<td>02aa804e-bde0afdd-112c0b34-7bc16630-4e384014</td>", "text/plain": "t"})]
    d = _notebook(tmp_path, "07_x.ipynb", outs, markdown="study 50414267 was odd")
    found = scan_notebook_outputs(d, COHORT)
    kinds = {(f.where.split()[0], f.detail) for f in found}
    assert ("output", "10000032") in kinds
    assert ("output", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014") in kinds
    assert ("markdown", "50414267") in kinds
    assert scan_notebook_outputs(d, COHORT, allow_ids=True) == []


def test_scanner_clean_notebook_and_images(tmp_path):
    charts = [nbformat.v4.new_output("display_data", data={"image/png": p, "text/plain": "fig"})
              for p in _chart_pngs()]
    clean = [nbformat.v4.new_output("stream", name="stdout", text="accuracy 0.812 on 1000032 images\n")] + charts
    d = _notebook(tmp_path, "06_x.ipynb", clean)
    assert scan_notebook_outputs(d, COHORT) == []
    xr = [nbformat.v4.new_output("display_data", data={"image/png": _xray_grid_png(), "text/plain": "fig"})]
    d = _notebook(tmp_path, "07_y.ipynb", xr)
    found = scan_notebook_outputs(d, COHORT)
    assert [f.kind for f in found] == ["image"] and found[0].notebook == "07_y.ipynb"
    assert scan_notebook_outputs(d, COHORT, allow_images=True) == []


def test_scanner_refuses_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="executed"):
        scan_notebook_outputs(tmp_path / "executed", COHORT)


# -- the notebooks on a fake run marked credentialed ---------------------------------
@pytest.fixture(scope="module")
def fake_run_trak(tmp_path_factory):
    from test_analysis import build_fake_run

    return build_fake_run(tmp_path_factory.mktemp("fakecred"), with_trak=True)


def _run_nb(name, out_dir, params):
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(REPO_ROOT / "notebooks" / name), str(out_dir / name), parameters=params,
                               kernel_name="python3", cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)


def test_credentialed_notebooks_show_no_ids_or_images(fake_run_trak, tmp_path):
    r = fake_run_trak
    common = dict(run_dir=str(r["run_dir"]), credentialed=True, publish_identifiers=False,
                  publish_images=False)
    nb07 = dict(image_size=16, n_targets=2, n_top=4, min_group_n=5)
    _run_nb("06_per_race.ipynb", tmp_path / "cred", dict(common, n_boot=50))
    _run_nb("07_error_analysis.ipynb", tmp_path / "cred", dict(common, **nb07))
    assert scan_notebook_outputs(tmp_path / "cred", r["cohort"]) == []

    # the same notebook allowed to publish shows ids and images, and the scanner sees them
    _run_nb("07_error_analysis.ipynb", tmp_path / "open",
            dict(common, **nb07, publish_identifiers=True, publish_images=True))
    found = scan_notebook_outputs(tmp_path / "open", r["cohort"])
    assert {"identifier", "image"} <= {f.kind for f in found}
    assert scan_notebook_outputs(tmp_path / "open", r["cohort"], allow_ids=True, allow_images=True) == []
