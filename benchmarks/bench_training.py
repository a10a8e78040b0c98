"""Training throughput (images/s) of ResNet-9 and ResNet-50: memmap cache vs in-memory batches.

For each architecture and device it times ``--steps`` SGD steps (after
``--warmup`` untimed steps) in two modes:

- ``memmap``: batches read through ``training.MemmapBatches`` from a uint8
  memmap file on disk (the real pipeline: read, scale, normalise, copy);
- ``in_memory``: one random float batch already on the device (the ceiling:
  compute only).

CPU always (fp32); CUDA when available (bf16 autocast + channels_last, as in
training). Prints a table and writes JSON to ``--out``.

    PYTHONPATH=. python benchmarks/bench_training.py --out benchmarks/results/training.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from d3m_lib.models import build_model, count_params
from d3m_lib.training import MemmapBatches, TrainConfig, _autocast, epoch_batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(arch: str, width: int, px: int, batch: int, steps: int, warmup: int, device: torch.device,
          mode: str, images: np.ndarray) -> dict:
    """Time ``steps`` training steps; returns a result row."""
    torch.manual_seed(0)
    model = build_model(arch, num_outputs=1, width=width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    cfg = TrainConfig(arch=arch, width=width, image_size=px, batch_size=batch)
    ds = MemmapBatches(images, np.arange(len(images)), np.zeros(len(images), np.float32), cfg)
    fixed = (torch.randn(batch, 1, px, px, device=device), torch.rand(batch, device=device).round())
    batches = [b for e in range(1 + (steps + warmup) * batch // len(images) + 1)
               for b in epoch_batches(len(images), batch, 0, e)]

    def step(i: int) -> None:
        if mode == "memmap":
            x, y = ds[batches[i]]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        else:
            x, y = fixed
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            out = model(x)
        loss = F.binary_cross_entropy_with_logits(out.float().reshape(-1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for i in range(warmup, warmup + steps):
        step(i)
        n += len(batches[i]) if mode == "memmap" else batch
    _sync(device)
    dt = time.perf_counter() - t0
    return dict(arch=arch, width=width if arch == "resnet9" else None, image_size=px, batch_size=batch,
                device=device.type, precision="bf16" if device.type == "cuda" else "fp32", mode=mode,
                steps=steps, seconds=round(dt, 3), img_per_s=round(n / dt, 1),
                params=count_params(model))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet9", "resnet50"])
    p.add_argument("--width", type=int, default=16, help="ResNet-9 width")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--n-images", type=int, default=2048, help="images in the temporary memmap")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"images_{a.image_size}.u8"
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(a.n_images, a.image_size, a.image_size))
        mm[:] = rng.integers(0, 256, mm.shape, dtype=np.uint8)
        mm.flush()
        images = np.memmap(path, dtype=np.uint8, mode="r", shape=mm.shape)
        for dev in devices:
            device = torch.device(dev)
            for arch in a.archs:
                for mode in ("memmap", "in_memory"):
                    r = bench(arch, a.width, a.image_size, a.batch_size, a.steps, a.warmup, device, mode, images)
                    rows.append(r)
                    print(f"{r['arch']:9s} {r['device']:5s} {r['precision']:5s} {r['mode']:10s} "
                          f"{r['img_per_s']:10.1f} img/s  ({r['steps']} steps, {r['seconds']:.2f} s)", flush=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), cpu_threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, args=vars(a) | {
                    "out": str(a.out) if a.out else None})
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
