"""The detector comparison's replay (training.detectors): identities rotate on refusal, the run stops at the first
success or when none is left, and a recorded Square stream ends at the query that fooled the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.detectors import Blacklight, replay


class RefuseAfter:
    """A fake detector refusing every identity from its `n`-th query on (its own count)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, {}

    def refuses(self, client: str, x: np.ndarray) -> bool:
        self.seen[client] = self.seen.get(client, 0) + 1
        return self.seen[client] > self.n


def test_replay_rotates_identities_and_stops_when_none_is_left() -> None:
    stream = np.zeros((100, 1, 4, 4), np.float32)
    r = replay(RefuseAfter(3), "t", stream, first=None, identities=2)  # type: ignore[arg-type]
    # 2 identities × 3 answered queries each, then both refused at query 6
    assert (r.stopped_at, r.first_refusal, r.refused) == (6, 6, 2)
    r = replay(RefuseAfter(3), "t", stream, first=4, identities=2)  # type: ignore[arg-type]
    assert r.stopped_at is None and r.first_refusal is None and r.refused == 0  # the attack succeeded first


def test_replay_through_blacklight_stops_near_duplicates_not_distinct_images() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((1, 28, 28)).astype(np.float32)
    near = np.stack([np.clip(base + rng.normal(0, 0.002, base.shape), 0, 1) for _ in range(40)]).astype(np.float32)
    assert replay(Blacklight(), "dup", near, first=None, identities=1).stopped_at is not None
    distinct = rng.random((40, 1, 28, 28)).astype(np.float32)
    assert replay(Blacklight(), "distinct", distinct, first=None, identities=1).stopped_at is None


def test_record_ends_at_the_first_fooling_query() -> None:
    pytest.importorskip("torchattacks", reason="needs torchattacks (scripts/setup.sh --dev)")
    from training.detectors import record

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.rand(3, 1, 4, 4).numpy()
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    for queries, first in record(model, x, y, "linf", 0.5, 50, transformed=False):
        assert 1 <= len(queries) <= 50
        if first is not None:
            assert first == len(queries) - 1  # Square stops an image once it is fooled
