"""Decode each image once into a resized greyscale uint8 memmap.

Files in ``cache_dir`` for an image size ``px``:

- ``images_<px>.u8``: ``np.memmap`` uint8 of shape (N, px, px), row i = ``paths[i]``
  (the cohort table's ``row``);
- ``done_<px>.npy``: bool (N,), True once row i is written; saved after every
  chunk, so an interrupted build resumes and skips finished rows;
- ``failed_<px>.csv``: ``index, path, error`` of images that could not be read
  (their pixels stay 0). Not fatal here: ``cohort.exclude_unreadable`` drops them
  from the cohort table (which keeps each image's cache ``row``, so the cache is
  decoded once and never rewritten), and ``open_cache(rows=...)`` refuses a
  table that still refers to one of them;
- ``dims_<px>.i32``: ``np.memmap`` int32 of shape (N, 2), each image's width and
  height in pixels as stored in its file (0, 0 where it could not be read): the
  cohort compares them with the metadata (``cohort.exclude_bad_sizes``);
- ``stat_<px>.npy``: int64 (N, 2), each file's size and modification time (ns)
  when the build that decoded it began (-1 for an absent file);
- ``meta_<px>.json``: N, size, SHA-256 of the path list, ``complete``. A cache
  whose path list differs from the one asked for is rebuilt (with a printed
  message), never reused.

Every build of a cache with the same path list decodes again the rows that
failed before (a restored file is read) and the rows whose file's size or
modification time changed (one ``stat`` per image: about as long as the
cohort's own check that each file exists), and nothing else.

Decoding: Pillow. For JPEG, ``Image.draft("L", (px, px))`` makes libjpeg decode
at 1/2, 1/4 or 1/8 scale (DCT scaling, the largest reduction that stays at
least px on each side) and straight to greyscale, in up to 1/64 of the memory.
Measured on a 2,500 x 3,000 px quality-95 JPEG (MIMIC-CXR-JPG's size and
quality) on one core: 53 ms per image against 96 ms for a full decode (entropy
decoding is not reduced), so ~377k MIMIC images take about 5.5 core-hours.
(``torchvision.io.decode_jpeg`` always decodes at full size, which is why it is
not used here.) The image is then resized to px x px (the whole field of view,
aspect ratio not kept, as is usual for chest X-ray classifiers) with Pillow's
bilinear filter, whose support widens with the downscale factor (antialiased).
16-bit PNGs are scaled from 0..65535 to 0..255. Work is split into chunks of
rows; a ``ProcessPoolExecutor`` decodes chunks in parallel and each worker
writes its rows straight into the memmap, so no more than a chunk of images is
ever in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # annotations only; pandas is imported where it is used
    import pandas as pd

# pandas and tqdm are imported where used: worker processes import only numpy and Pillow.

CACHE_VERSION = 3   # 2: stat_<px>.npy, failed and changed rows decoded again; 3: dims_<px>.i32


@dataclass
class CacheReport:
    """What ``build_cache`` did: N images, how many failed (and which), seconds spent."""

    n: int
    n_failed: int
    failed: "pd.DataFrame"
    seconds: float
    n_decoded: int = 0
    reused: bool = False
    failed_path: Path | None = None  # failed_<px>.csv, the list of unreadable images
    dims: np.ndarray | None = None   # (N, 2) width, height of each image as stored (0, 0: unreadable)


def cache_files(cache_dir: str | Path, image_size: int) -> dict[str, Path]:
    """The four files of one cache size."""
    d = Path(cache_dir)
    px = int(image_size)
    return dict(images=d / f"images_{px}.u8", done=d / f"done_{px}.npy",
                failed=d / f"failed_{px}.csv", meta=d / f"meta_{px}.json", stat=d / f"stat_{px}.npy",
                dims=d / f"dims_{px}.i32")


def file_stats(paths: Sequence[str | Path]) -> np.ndarray:
    """int64 (N, 2): size and modification time (ns) of each file; -1, -1 where it is absent."""
    import os

    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out


def paths_hash(paths: Sequence[str | Path]) -> str:
    """SHA-256 of the path list (order matters: row i is paths[i])."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """One image as uint8 (image_size, image_size) greyscale; raises on unreadable files."""
    px = int(image_size)
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("L", (px, px))
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8))
        elif im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
        elif im.mode != "L":
            im = im.convert("L")
        im = im.resize((px, px), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _process_chunk(mm_path: str, n: int, px: int, rows: np.ndarray,
                   paths: list[str]) -> list[tuple[int, str, str]]:
    """Decode ``paths`` into rows ``rows`` of the memmap; return (index, path, error) of failures."""
    mm = np.memmap(mm_path, dtype=np.uint8, mode="r+", shape=(n, px, px))
    dims = np.memmap(_dims_path(mm_path), dtype=np.int32, mode="r+", shape=(n, 2))
    failed = []
    for i, p in zip(rows, paths):
        try:
            with Image.open(p) as im:   # the header only: the size as stored
                dims[i] = im.size
            mm[i] = load_image(p, px)
        except Exception as e:  # any unreadable file: record it, leave zeros, go on
            mm[i] = 0
            dims[i] = 0
            failed.append((int(i), str(p), f"{type(e).__name__}: {e}"))
    mm.flush()
    dims.flush()
    del mm, dims
    return failed


def _dims_path(images_path: str | Path) -> Path:
    p = Path(images_path)
    return p.with_name(p.name.replace("images_", "dims_").replace(".u8", ".i32"))


def image_dims(cache_dir: str | Path, image_size: int) -> np.ndarray:
    """int32 (N, 2): width and height of each cached image's file (0, 0 where unreadable)."""
    f = cache_files(cache_dir, image_size)
    n = int(json.loads(f["meta"].read_text())["n"])
    return np.array(np.memmap(f["dims"], dtype=np.int32, mode="r", shape=(max(n, 1), 2))[:n])


def _save_done(done: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, done)
    tmp.replace(path)


def _write_failed(failed: list[tuple[int, str, str]], path: Path) -> "pd.DataFrame":
    import pandas as pd

    df = pd.DataFrame(failed, columns=["index", "path", "error"]).sort_values("index")
    df = df.reset_index(drop=True)
    df.to_csv(path, index=False)
    return df


def _read_failed(path: Path) -> list[tuple[int, str, str]]:
    if not path.exists():
        return []
    import pandas as pd

    df = pd.read_csv(path, dtype={"index": int, "path": str, "error": str}, keep_default_na=False)
    return list(df.itertuples(index=False, name=None))


def build_cache(paths: Sequence[str | Path], cache_dir: str | Path, image_size: int,
                workers: int = 2, chunk: int = 256, progress: bool = True) -> CacheReport:
    """Decode ``paths`` into ``cache_dir/images_<px>.u8`` (see the module docstring).

    A complete cache with the same path list is reused; an incomplete one resumes
    (rows already done are not decoded again); one built from another path list
    is deleted and rebuilt, saying so. ``workers <= 1`` decodes in this process.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    px, n = int(image_size), len(paths)
    if px < 1:
        raise ValueError(f"image_size={image_size}: must be a positive integer")
    f = cache_files(cache_dir, px)
    f["images"].parent.mkdir(parents=True, exist_ok=True)
    meta = dict(n=n, image_size=px, paths_sha256=paths_hash(paths), version=CACHE_VERSION)

    old = json.loads(f["meta"].read_text()) if f["meta"].exists() else None
    same = old is not None and all(old.get(k) == v for k, v in meta.items())
    if old is not None and not same:
        why = [k for k, v in meta.items() if old.get(k) != v]
        print(f"[image_cache] {f['images'].name} was built for another "
              f"{'path list' if 'paths_sha256' in why else ', '.join(why)}: rebuilding")
    stats = file_stats(paths)
    if same and f["images"].exists() and f["done"].exists() and f["dims"].exists():
        done = np.load(f["done"])
        failed = _read_failed(f["failed"])
        old_stats = np.load(f["stat"]) if f["stat"].exists() else None
        retry = np.zeros(n, dtype=bool)
        retry[[int(r[0]) for r in failed]] = True
        moved = (done & ~retry & (stats != old_stats).any(axis=1) if old_stats is not None
                 and old_stats.shape == stats.shape else done & ~retry)
        if (retry | moved).any():
            print(f"[image_cache] decoding again: {int(retry.sum())} image(s) that could not be read "
                  f"before, {int(moved.sum())} whose file changed since it was cached")
            done &= ~(retry | moved)
            _save_done(done, f["done"])
    else:
        if f["images"].exists() and old is None:
            print(f"[image_cache] {f['images'].name} has no meta file: rebuilding")
        elif same:
            print(f"[image_cache] {f['images'].name} or {f['done'].name} is missing: rebuilding")
        for p in f.values():
            p.unlink(missing_ok=True)
        done = np.zeros(n, dtype=bool)
        failed = []
        mm = np.memmap(f["images"], dtype=np.uint8, mode="w+", shape=(max(n, 1), px, px))
        dims = np.memmap(f["dims"], dtype=np.int32, mode="w+", shape=(max(n, 1), 2))
        del mm, dims
        _save_done(done, f["done"])
        f["meta"].write_text(json.dumps({**meta, "complete": False}, indent=2))

    tmp = f["stat"].with_name(f["stat"].stem + ".tmp.npy")
    np.save(tmp, stats)
    tmp.replace(f["stat"])
    todo = np.flatnonzero(~done)
    reused = len(todo) == 0
    if 0 < len(todo) < n:
        print(f"[image_cache] resuming: {n - len(todo)} of {n} images already cached")
    failed = [r for r in failed if done[r[0]]]  # failures of finished rows only
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), max(1, int(chunk)))]
    strs = [str(p) for p in paths]
    bar = tqdm(total=len(todo), desc=f"decoding images ({px}px)", unit="img",
               disable=not progress or not len(todo), mininterval=1.0)

    def finished(rows: np.ndarray, fl: list) -> None:
        done[rows] = True
        failed.extend(fl)
        _save_done(done, f["done"])
        if fl:
            _write_failed(failed, f["failed"])
        bar.update(len(rows))

    shape_n = max(n, 1)
    if workers <= 1 or len(chunks) <= 1:
        for rows in chunks:
            finished(rows, _process_chunk(str(f["images"]), shape_n, px, rows, [strs[i] for i in rows]))
    else:
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=get_context("spawn")) as ex:
            futs = {ex.submit(_process_chunk, str(f["images"]), shape_n, px, rows,
                              [strs[i] for i in rows]): rows for rows in chunks}
            for fut in as_completed(futs):
                finished(futs[fut], fut.result())
    bar.close()

    fdf = _write_failed(failed, f["failed"])
    f["meta"].write_text(json.dumps({**meta, "complete": True, "n_failed": len(fdf)}, indent=2))
    if len(fdf):
        print(f"[image_cache] {len(fdf)} of {n} images could not be read (pixels left 0); "
              f"listed in {f['failed']}")
    return CacheReport(n=n, n_failed=len(fdf), failed=fdf, seconds=time.perf_counter() - t0,
                       n_decoded=len(todo), reused=reused, failed_path=f["failed"],
                       dims=image_dims(cache_dir, px))


def open_cache(cache_dir: str | Path, image_size: int, expected_n: int | None = None,
               paths: Sequence[str | Path] | None = None,
               rows: Sequence[int] | None = None) -> np.memmap:
    """The cached images, read-only, shape (N, px, px), N = images the cache was built from.

    Raises FileNotFoundError if there is no cache of that size, RuntimeError if
    it is incomplete, or if the optional checks fail: ``expected_n`` (the
    cache's own N), ``paths`` (the path list it was built from), ``rows`` (the
    cohort table's ``row`` column: every row must lie in 0..N-1 and none may be
    an image listed as unreadable in ``failed_<px>.csv``). Pass ``rows`` for a
    cohort from ``cohort.exclude_unreadable``: its table is shorter than N.
    """
    px = int(image_size)
    f = cache_files(cache_dir, px)
    if not f["meta"].exists() or not f["images"].exists():
        raise FileNotFoundError(f"no {px}px image cache in {cache_dir} (expected {f['images'].name} "
                                f"and {f['meta'].name}); run build_cache first")
    meta = json.loads(f["meta"].read_text())
    n = int(meta["n"])
    done = np.load(f["done"]) if f["done"].exists() else np.zeros(0, bool)
    if not meta.get("complete") or len(done) != n or not done.all():
        raise RuntimeError(f"image cache {f['images']} is incomplete ({int(done.sum())} of "
                           f"{n} images); run build_cache again to finish it")
    if expected_n is not None and n != expected_n:
        n_failed = int(meta.get("n_failed", 0))
        hint = (f" ({n_failed} of them unreadable: a cohort without them keeps the cache's row "
                f"numbers, check it with rows=cohort['row'] instead of expected_n)" if n_failed else "")
        raise RuntimeError(f"image cache {f['images']} holds {n} images, expected {expected_n}{hint}")
    if paths is not None and paths_hash(paths) != meta["paths_sha256"]:
        raise RuntimeError(f"image cache {f['images']} was built from another path list; rebuild it")
    if rows is not None:
        r = np.asarray(rows, dtype=np.int64)
        out = r[(r < 0) | (r >= n)]
        if len(out):
            raise RuntimeError(f"image cache {f['images']} holds rows 0..{n - 1}, but {len(out)} "
                               f"row(s) asked for lie outside (e.g. {out[:5].tolist()}); "
                               f"the cohort table and the cache do not belong together")
        bad = np.intersect1d(r, [i for i, _, _ in _read_failed(f["failed"])])
        if len(bad):
            raise RuntimeError(f"{len(bad)} row(s) asked for are images that could not be read "
                               f"(e.g. {bad[:5].tolist()}, listed in {f['failed']}); exclude them "
                               f"from the cohort with cohort.exclude_unreadable")
    return np.memmap(f["images"], dtype=np.uint8, mode="r", shape=(max(n, 1), px, px))[:n]
