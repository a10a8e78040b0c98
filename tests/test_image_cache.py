"""Image cache: round trip, resume after interruption, corrupt files, stale path lists."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from d3m_lib import image_cache
from d3m_lib.image_cache import build_cache, cache_files, load_image, open_cache


def constant_pngs(folder, values, size=(40, 30)):
    """One greyscale PNG per value, every pixel equal to it."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(values):
        p = folder / f"c{i:03d}.png"
        Image.fromarray(np.full(size[::-1], v, np.uint8)).save(p)
        paths.append(p)
    return paths


def test_round_trip_constant_images(tmp_path):
    vals = [0, 17, 128, 255, 64]
    paths = constant_pngs(tmp_path / "img", vals)
    rep = build_cache(paths, tmp_path / "cache", 8, workers=1, progress=False)
    assert (rep.n, rep.n_failed, rep.n_decoded) == (5, 0, 5)
    mm = open_cache(tmp_path / "cache", 8, expected_n=5, paths=paths)
    assert mm.shape == (5, 8, 8) and mm.dtype == np.uint8
    for i, v in enumerate(vals):
        assert (mm[i] == v).all()
    meta = json.loads(cache_files(tmp_path / "cache", 8)["meta"].read_text())
    assert meta["complete"] and meta["n"] == 5 and meta["image_size"] == 8
    again = build_cache(paths, tmp_path / "cache", 8, workers=1, progress=False)
    assert again.reused and again.n_decoded == 0


def test_resize_is_area_faithful_and_modes(tmp_path):
    # 64x64 quadrants -> 4x4: each corner output pixel sees only its own quadrant
    a = np.zeros((64, 64), np.uint8)
    a[:32, 32:], a[32:, :32], a[32:, 32:] = 100, 200, 50
    Image.fromarray(a).save(tmp_path / "q.png")
    out = load_image(tmp_path / "q.png", 4)
    assert (out[0, 0], out[0, 3], out[3, 0], out[3, 3]) == (0, 100, 200, 50)
    # RGB, 16-bit and JPEG inputs all become uint8 greyscale
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "rgb.png")
    assert (load_image(tmp_path / "rgb.png", 5) == 90).all()
    Image.fromarray(np.full((20, 20), 257 * 40, np.uint16)).save(tmp_path / "g16.png")
    assert (load_image(tmp_path / "g16.png", 5) == 40).all()
    Image.fromarray(np.full((300, 240), 150, np.uint8)).save(tmp_path / "c.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "c.jpg", 16).astype(int) - 150).max() <= 2


def test_resume_skips_done_chunks(tmp_path, monkeypatch):
    paths = constant_pngs(tmp_path / "img", list(range(0, 250, 25)))  # 10 images
    real = image_cache._process_chunk
    calls = []

    def interrupt_after_first(mm, n, px, rows, ps):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(list(rows))
        return real(mm, n, px, rows, ps)

    monkeypatch.setattr(image_cache, "_process_chunk", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, tmp_path / "cache", 6, workers=1, chunk=4, progress=False)
    done = np.load(cache_files(tmp_path / "cache", 6)["done"])
    assert done.tolist() == [True] * 4 + [False] * 6
    with pytest.raises(RuntimeError, match="incomplete"):
        open_cache(tmp_path / "cache", 6)

    decoded = []
    monkeypatch.setattr(image_cache, "load_image",
                        lambda p, px, _f=image_cache.load_image: decoded.append(str(p)) or _f(p, px))
    monkeypatch.setattr(image_cache, "_process_chunk", real)
    rep = build_cache(paths, tmp_path / "cache", 6, workers=1, chunk=4, progress=False)
    assert decoded == [str(p) for p in paths[4:]] and rep.n_decoded == 6
    mm = open_cache(tmp_path / "cache", 6)
    assert [int(mm[i, 0, 0]) for i in range(10)] == list(range(0, 250, 25))


def test_corrupt_and_missing_images_reported(tmp_path, capsys):
    paths = constant_pngs(tmp_path / "img", [10, 20, 30])
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    gone = tmp_path / "img" / "absent.png"
    paths = [paths[0], bad, paths[1], gone, paths[2]]
    rep = build_cache(paths, tmp_path / "cache", 4, workers=1, chunk=2, progress=False)
    assert rep.n_failed == 2 and rep.failed["index"].tolist() == [1, 3]
    assert rep.failed["path"].tolist() == [str(bad), str(gone)]
    assert "could not be read" in capsys.readouterr().out
    on_disk = pd.read_csv(cache_files(tmp_path / "cache", 4)["failed"])
    assert on_disk["index"].tolist() == [1, 3] and on_disk["error"].str.len().min() > 0
    mm = open_cache(tmp_path / "cache", 4)
    assert [int(mm[i].max()) for i in range(5)] == [10, 0, 20, 0, 30]
    # a reused cache reports the same failures
    assert build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False).n_failed == 2


def test_stale_path_list_rebuilds(tmp_path, capsys):
    paths = constant_pngs(tmp_path / "img", [5, 50, 150])
    build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    rev = paths[::-1]
    with pytest.raises(RuntimeError, match="another path list"):
        open_cache(tmp_path / "cache", 4, paths=rev)
    rep = build_cache(rev, tmp_path / "cache", 4, workers=1, progress=False)
    assert "rebuilding" in capsys.readouterr().out and rep.n_decoded == 3 and not rep.reused
    mm = open_cache(tmp_path / "cache", 4, paths=rev)
    assert [int(mm[i, 0, 0]) for i in range(3)] == [150, 50, 5]


def test_parallel_workers_match_serial(tmp_path):
    paths = constant_pngs(tmp_path / "img", list(range(0, 240, 20)))
    build_cache(paths, tmp_path / "a", 6, workers=1, chunk=3, progress=False)
    rep = build_cache(paths, tmp_path / "b", 6, workers=2, chunk=3, progress=False)
    assert rep.n_decoded == 12 and rep.n_failed == 0
    assert np.array_equal(open_cache(tmp_path / "a", 6), open_cache(tmp_path / "b", 6))


def test_open_cache_without_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_cache"):
        open_cache(tmp_path, 32)


def test_open_cache_rows_checked(tmp_path):
    paths = constant_pngs(tmp_path / "img", [10, 20, 30])
    build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    assert open_cache(tmp_path / "cache", 4, rows=[0, 2]).shape == (3, 4, 4)
    with pytest.raises(RuntimeError, match=r"rows 0\.\.2, but 1 row\(s\) asked for lie outside "
                                           r"\(e\.g\. \[3\]\)"):
        open_cache(tmp_path / "cache", 4, rows=[0, 3])
    with pytest.raises(RuntimeError, match=r"holds 3 images, expected 2$"):
        open_cache(tmp_path / "cache", 4, expected_n=2)


def test_failed_rows_are_decoded_again_and_a_restored_file_fixes_the_cache(tmp_path, capsys):
    """Following "restore these files" works; a changed file is decoded again."""
    paths = constant_pngs(tmp_path / "img", [10, 20, 30, 40])
    good = paths[1].read_bytes()
    paths[1].write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths[3].unlink()
    rep = build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    assert rep.failed["index"].tolist() == [1, 3]
    again = build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    assert again.n_decoded == 2 and again.n_failed == 2 and not again.reused   # tried again, still broken
    assert "2 image(s) that could not be read before" in capsys.readouterr().out
    paths[1].write_bytes(good)                                                  # restored, byte for byte
    Image.fromarray(np.full((30, 40), 40, np.uint8)).save(paths[3])            # and the absent one
    rep = build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    assert rep.n_failed == 0 and rep.n_decoded == 2
    assert pd.read_csv(cache_files(tmp_path / "cache", 4)["failed"]).empty
    mm = open_cache(tmp_path / "cache", 4, rows=[0, 1, 2, 3])
    assert [int(mm[i].max()) for i in range(4)] == [10, 20, 30, 40]
    # a file replaced by another image (new size or time) is decoded again; the others are not
    Image.fromarray(np.full((30, 40), 99, np.uint8)).save(paths[2])
    rep = build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False)
    assert rep.n_decoded == 1 and "1 whose file changed" in capsys.readouterr().out
    assert int(open_cache(tmp_path / "cache", 4)[2].max()) == 99
    assert build_cache(paths, tmp_path / "cache", 4, workers=1, progress=False).reused
