"""training: CPU determinism, the two-call 5 + 10 schedule, loss goes down, predictions, resume."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from d3m_lib.training import (TrainConfig, checkpoint_steps, continuation_batches, continuation_steps,
                              continue_lr_at, continue_training, epoch_batches, lr_at, masked_bce,
                              predict, run_baseline, task_rows, to_tensor, train)

PX = 16


def fake_cohort(tmp_path, n=160, seed=0):
    """A tiny cohort table + uint8 memmap whose positives carry a bright square (learnable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    img = rng.integers(0, 90, (n, PX, PX)).astype(np.uint8)
    img[y == 1, 4:10, 4:10] = 230
    mm = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=img.shape)
    mm[:] = img
    mm.flush()
    images = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="r", shape=img.shape)
    split = np.array(["train"] * (n // 2) + ["validate"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    y2 = y.copy()
    y2[::7] = np.nan
    cohort = pd.DataFrame({"row": np.arange(n), "split": split,
                           "group": rng.choice(["A", "B"], n), "Cardiomegaly": y, "Edema": y2})
    return cohort, images


def cfg(**kw):
    base = dict(width=4, image_size=PX, batch_size=16, lr=0.05, epochs_anchor=2, epochs_more=2,
                device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return torch.load(path, weights_only=True)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_identical_checkpoints_other_seed_differs(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    rows, y, _ = task_rows(cohort, "Cardiomegaly", "train")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(cfg(seed=seed), images, rows, y, (0, 2), tmp_path / name, progress=False)
    a, b, c = (_weights(tmp_path / n / "epoch_02.pt") for n in "abc")
    assert _same(a, b)
    assert not _same(a, c)


def test_two_call_schedule_is_reproducible_and_matches_documented_procedure(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    rows, y, _ = task_rows(cohort, "Cardiomegaly", "train")
    c = cfg()
    # run 1: anchor then continuation in the same folder
    train(c, images, rows, y, (0, 2), tmp_path / "r1", progress=False)
    continue_training(c, images, rows, y, tmp_path / "r1" / "epoch_02.pt", tmp_path / "r1", progress=False)
    # run 2: anchor with the 1-based range form, continuation elsewhere
    train(c, images, rows, y, range(1, 3), tmp_path / "r2a", progress=False)
    continue_training(c, images, rows, y, tmp_path / "r2a" / "epoch_02.pt", tmp_path / "r2b", progress=False)
    assert _same(_weights(tmp_path / "r1" / "epoch_04.pt"), _weights(tmp_path / "r2b" / "epoch_04.pt"))
    hist = pd.read_csv(tmp_path / "r1" / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3, 4]
    # a continuation on a subset (D3M) starts from the same anchor and differs only in data
    continue_training(c, images, rows[:30], y[:30], tmp_path / "r1" / "epoch_02.pt", tmp_path / "sub",
                      progress=False, n_reference=len(rows))
    assert not _same(_weights(tmp_path / "r1" / "epoch_04.pt"), _weights(tmp_path / "sub" / "epoch_04.pt"))
    with pytest.raises(ValueError, match="init_checkpoint"):
        train(c, images, rows, y, (2, 4), tmp_path / "x", progress=False)


@pytest.mark.parametrize("kept_fraction", [1.0, 0.75, 0.4, 0.1])
def test_every_arm_takes_erms_steps_with_the_same_schedule(kept_fraction):
    c = cfg(batch_size=16, epochs_more=3)
    n_train = 80
    budget = continuation_steps(c, n_train)
    assert budget == 3 * 5
    n_kept = max(2, int(round(kept_fraction * n_train)))
    batches = continuation_batches(n_kept, c, budget)
    assert len(batches) == budget                                  # equal steps, whatever is kept
    seen = np.bincount(np.concatenate(batches), minlength=n_kept)
    assert seen.sum() >= budget and seen.min() >= 1                 # every kept row is used
    assert seen.max() - seen.min() <= 1 + math.ceil(3 * n_train / n_kept) - 3 * n_train // n_kept
    if kept_fraction == 1.0:   # all rows: exactly epochs_more epochs, the epoch shuffles of train()
        assert all(np.array_equal(a, b) for a, b in zip(
            batches, [b for e in (3, 4, 5) for b in epoch_batches(n_train, 16, 0, e)]))
    lrs = [continue_lr_at(c, s, budget) for s in range(budget + 1)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(c.lr) and lrs[-1] == 0   # warm restart, to 0
    assert checkpoint_steps(c, budget) == {3: 5, 4: 10, 5: 15}


def test_continuation_steps_are_counted_and_saved_per_arm(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    rows, y, _ = task_rows(cohort, "Cardiomegaly", "train")
    c = cfg(epochs_anchor=1, epochs_more=2)
    train(c, images, rows, y, (0, 1), tmp_path / "anchor", progress=False)
    budget = continuation_steps(c, len(rows))
    for name, n in (("all", len(rows)), ("half", len(rows) // 2), ("few", 12)):
        hist = continue_training(c, images, rows[:n], y[:n], tmp_path / "anchor" / "epoch_01.pt",
                                 tmp_path / name, progress=False, n_reference=len(rows))
        assert hist["step"].tolist() == [budget // 2, budget] and hist["epoch"].tolist() == [2, 3]
        assert (tmp_path / name / "epoch_03.pt").exists() and hist["n_rows"].eq(n).all()
    assert continue_lr_at(c, budget / 2, budget) == pytest.approx(continue_lr_at(cfg(epochs_anchor=7), budget / 2,
                                                                                 budget))


def test_lr_schedule_spans_full_horizon():
    c = cfg(lr=1.0, warmup_epochs=1, epochs_anchor=5, epochs_more=10)
    assert lr_at(c, 0) == 0 and lr_at(c, 1) == 1.0 and lr_at(c, 15) == 0
    assert lr_at(c, 8) == pytest.approx(1 - 7 / 14)
    assert lr_at(cfg(lr_schedule="constant", lr=0.3), 3.5) == 0.3


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = epoch_batches(50, 16, seed=0, epoch=3)
    assert [len(b) for b in a] == [13, 13, 12, 12]  # ceil(50/16)=4 near-equal batches
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(50))
    assert all(np.array_equal(x, z) for x, z in zip(a, epoch_batches(50, 16, seed=0, epoch=3)))
    assert not np.array_equal(a[0], epoch_batches(50, 16, seed=0, epoch=4)[0])


def test_tiny_training_lowers_loss_and_separates_classes(tmp_path):
    cohort, images = fake_cohort(tmp_path, n=240)
    tr, va = task_rows(cohort, "Cardiomegaly", "train"), task_rows(cohort, "Cardiomegaly", "validate")
    hist = train(cfg(epochs_anchor=4, epochs_more=0, lr=0.1), images, tr[0], tr[1], (0, 4), tmp_path / "m",
                 val=va, progress=False)
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    assert hist["val_auroc"].iloc[-1] > 0.9
    logits = predict(tmp_path / "m" / "epoch_04.pt", cfg(), images, va[0])
    assert logits.shape == (len(va[0]),)
    assert logits[va[1] == 1].mean() > logits[va[1] == 0].mean()


def test_multilabel_masked_loss_and_training(tmp_path):
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    logits = torch.zeros(2, 2)
    assert masked_bce(logits, y).item() == pytest.approx(np.log(2))
    cohort, images = fake_cohort(tmp_path)
    tr = cohort[cohort.split == "train"]
    hist = train(cfg(epochs_anchor=1, epochs_more=0), images, tr["row"], tr[["Cardiomegaly", "Edema"]].to_numpy(),
                 (0, 1), tmp_path / "ml", num_outputs=2, progress=False)
    assert np.isfinite(hist["train_loss"]).all()
    out = predict(tmp_path / "ml" / "epoch_01.pt", cfg(), images, np.arange(5), num_outputs=2)
    assert out.shape == (5, 2)


def test_bad_labels_and_sizes(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    rows = cohort.row.to_numpy()[:10]
    with pytest.raises(ValueError, match="NaN"):
        train(cfg(), images, rows, cohort["Edema"].to_numpy()[:10], (0, 1), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        train(cfg(image_size=32), images, rows, np.zeros(10), (0, 1), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(cfg(), images, rows, np.zeros(10), (0, 9), tmp_path / "x", progress=False)


def test_to_tensor_matches_training_input(tmp_path):
    _, images = fake_cohort(tmp_path)
    from d3m_lib.training import MemmapBatches
    x, _ = MemmapBatches(images, np.array([3, 1, 2]), None, cfg())[[0, 1, 2]]
    assert torch.equal(x, to_tensor(images[[3, 1, 2]]))


def test_run_baseline_writes_artifacts_and_resumes(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    out = tmp_path / "Cardiomegaly" / "seed0"
    log = MemoryLog()
    r1 = run_baseline(cfg(), images, cohort, "Cardiomegaly", out, progress=False, log=log)
    assert r1["resumed"] == []
    for e in range(1, 5):
        assert (out / f"epoch_{e:02d}.pt").exists()
    p = pd.read_parquet(out / "preds_test_epoch04.parquet")
    assert list(p.columns) == ["row", "split", "group", "y", "logit", "prob"]
    assert set(p["split"]) == {"test"} and len(p) == (cohort.split == "test").sum()
    assert (out / "preds_validate_epoch02.parquet").exists()
    info = json.loads((out / "threshold.json").read_text())
    assert info["rule"] == "youden" and 0 < info["threshold"] < 1
    mtime = (out / "epoch_04.pt").stat().st_mtime_ns
    r2 = run_baseline(cfg(), images, cohort, "Cardiomegaly", out, progress=False, log=log)
    assert r2["resumed"] == ["anchor", "more"] and r2["threshold"] == r1["threshold"]
    assert (out / "epoch_04.pt").stat().st_mtime_ns == mtime
    # a step whose file is gone is done again
    (out / "epoch_04.pt").unlink()
    assert run_baseline(cfg(), images, cohort, "Cardiomegaly", out, progress=False, log=log)["resumed"] == ["anchor"]


class MemoryLog:
    """The step-record protocol of ``rundir.StepLog``, in memory."""

    def __init__(self):
        self.steps = {}

    def done(self, key, signature=None, files=()):
        return self.steps.get(key, object()) == signature and all(f.exists() for f in files)

    def mark(self, key, signature=None):
        self.steps[key] = signature

    def forget(self, key):
        self.steps.pop(key, None)


def test_evaluate_uses_the_metric_engine(monkeypatch):
    from sklearn.metrics import roc_auc_score

    from d3m_lib import training as tr

    logits = np.array([[2.0, -1.0], [-0.5, 1.0], [1.5, np.nan], [-2.0, 0.5], [0.3, -0.2], [-1.0, 2.0]])
    y = np.array([[1, 0], [1, 1], [1, np.nan], [0, 1], [0, 0], [0, 0]], dtype=float)
    monkeypatch.setattr(tr, "predict", lambda *a, **k: np.nan_to_num(logits))
    groups = np.array(["B", "B", "A", "A", "C", "C"])
    rec = tr.evaluate(None, None, None, np.arange(6), y, groups, num_outputs=2)
    m = ~np.isnan(y)
    assert rec["val_acc"] == pytest.approx(((logits[m] > 0) == (y[m] == 1)).mean())
    assert rec["val_auroc"] == pytest.approx(np.mean([roc_auc_score(y[m[:, k], k], logits[m[:, k], k])
                                                      for k in range(2)]))
    # labelled (image, output) pairs: B 3/4 right, A 3/3, C 2/4 -> C
    assert rec["val_worst_group_acc"] == pytest.approx(0.5)
    rec = tr.evaluate(None, None, None, np.arange(6), y, groups, num_outputs=2, min_group_n=4)
    assert rec["val_worst_group_acc"] == pytest.approx(0.5)  # A (3 pairs) is not a candidate, C is
    rec = tr.evaluate(None, None, None, np.arange(6), y, groups, num_outputs=2, min_group_n=5)
    assert np.isnan(rec["val_worst_group_acc"])


def test_anchor_anneals_to_zero_within_its_own_epochs():
    c = cfg(lr=1.0, warmup_epochs=1, epochs_anchor=5, epochs_more=10)
    assert lr_at(c, 0) == 0 and lr_at(c, 1) == 1.0 and lr_at(c, 5) == 0
    assert lr_at(c, 3) == pytest.approx(0.5)                      # triangle over epochs 1..5
    assert lr_at(c, 5 - 1 / 20) == pytest.approx(1 / 20 / 4)     # last batch of 20: near zero
    p = np.linspace(0, 5, 2001)                                   # continuous across epoch boundaries
    assert np.abs(np.diff([lr_at(c, x) for x in p])).max() < 2.5 * (5 / 2000)
    cos = cfg(lr=1.0, warmup_epochs=1, epochs_anchor=5, epochs_more=10, lr_schedule="cosine")
    assert lr_at(cos, 5) == pytest.approx(0, abs=1e-12) and lr_at(cos, 3) == pytest.approx(0.5)
    # off: the single full-horizon curve (the anchor mid-descent at about 70% of the peak)
    off = cfg(lr=1.0, warmup_epochs=1, epochs_anchor=5, epochs_more=10, anchor_anneal=False)
    assert lr_at(off, 5) == pytest.approx(1 - 4 / 14)
    # no continuation: both rules are the same curve (the scan model's schedule is unchanged)
    for x in (0.5, 2.0, 4.9):
        assert lr_at(cfg(epochs_anchor=4, epochs_more=0), x) == \
            lr_at(cfg(epochs_anchor=4, epochs_more=0, anchor_anneal=False), x)


def test_anchor_history_records_lr_zero_at_the_anchor(tmp_path):
    cohort, images = fake_cohort(tmp_path)
    rows, y, _ = task_rows(cohort, "Cardiomegaly", "train")
    h = train(cfg(), images, rows, y, (0, 2), tmp_path / "a", progress=False)
    assert h["lr"].tolist()[-1] == 0 and h["lr"].tolist()[0] > 0
