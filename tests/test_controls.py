"""Control selections: sizes and determinism."""

import numpy as np
import pytest

from d3m_lib import controls


def test_random_removal_size_and_determinism():
    rows = np.arange(1000, 1100)
    a = controls.random_removal(rows, 17, seed=3)
    b = controls.random_removal(rows, 17, seed=3)
    c = controls.random_removal(rows, 17, seed=4)
    assert (~a).sum() == 17 and list(a.index) == list(rows)
    assert a.equals(b) and not a.equals(c)
    with pytest.raises(ValueError, match="n_remove"):
        controls.random_removal(rows, 101, seed=0)


def test_group_balanced():
    rows = np.arange(10)
    groups = ["W"] * 6 + ["B"] * 3 + ["A"] * 1
    k = controls.group_balanced(rows, groups, seed=0)
    kept_groups = np.array(groups)[k.to_numpy()]
    assert sorted(kept_groups.tolist()) == ["A", "B", "W"]
    assert k.equals(controls.group_balanced(rows, groups, seed=0))
    with pytest.raises(ValueError, match="no label"):
        controls.group_balanced(rows, groups[:-1] + [None], seed=0)


def test_label_balanced():
    rows = np.arange(20)
    y = [1] * 5 + [0] * 15
    k = controls.label_balanced(rows, y, seed=1)
    assert k.sum() == 10 and np.array(y)[k.to_numpy()].sum() == 5
