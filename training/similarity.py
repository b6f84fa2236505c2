"""The stateful detector of Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks" (2020),
for offline comparison with Blacklight on recorded query streams (not used in serving).

Each client's queries are embedded and kept in a buffer; a query is flagged when the mean distance from its
embedding to its k nearest neighbours in the client's buffer is below a threshold, set so that a fraction `fpr`
of benign queries is flagged (the paper: k = 50, fpr = 0.1 %, on a contrastively trained similarity encoder; here
any embedding: the project's GAN encoder, or raw pixels). As in the paper, a flagged client's buffer is cleared.

    det = SimilarityDetector.calibrate(embed, benign_images, fpr=0.001)   # embed: N×C×H×W → N×d
    det.observe("client", image)                                          # → True when flagged
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

Embed = Callable[[np.ndarray], np.ndarray]


def as_array(v: object) -> np.ndarray:
    """A torch tensor or array → float32 numpy, rows flattened."""
    detach = getattr(v, "detach", None)
    a = np.asarray(detach().cpu() if detach else v, dtype=np.float32)
    return a.reshape(len(a), -1)


def pixels(x: np.ndarray) -> np.ndarray:
    """The raw-pixel embedding."""
    return np.asarray(x, dtype=np.float32).reshape(len(x), -1)


def mean_knn_distance(e: np.ndarray, buffer: np.ndarray, k: int) -> float:
    """Mean L2 distance from embedding e to its k nearest rows of `buffer` (all of them when fewer)."""
    d = np.sqrt(((buffer - e) ** 2).sum(axis=1))
    k = min(k, len(d))
    return float(np.partition(d, k - 1)[:k].mean())


class SimilarityDetector:
    """Per-client buffers of embeddings; `observe` flags a query whose k-NN mean distance is below `threshold`."""

    def __init__(self, embed: Embed, threshold: float, k: int = 50, buffer: int = 10_000) -> None:
        self.embed, self.threshold, self.k, self.buffer = embed, threshold, k, buffer
        self.buffers: dict[str, deque[np.ndarray]] = {}
        self.detections: dict[str, int] = {}

    @classmethod
    def calibrate(cls, embed: Embed, benign: np.ndarray, fpr: float = 0.001, k: int = 50, buffer: int = 10_000,
                  batch: int = 256) -> SimilarityDetector:  # fmt: skip
        """Threshold = the `fpr` quantile of the benign images' mean distance to their k nearest other benign
        images (N×C×H×W, N > k)."""
        if len(benign) <= k:
            raise ValueError(f"calibration needs more than k = {k} benign images, got {len(benign)}")
        e = np.concatenate([as_array(embed(benign[i : i + batch])) for i in range(0, len(benign), batch)])
        sq = (e**2).sum(axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, 0))
        np.fill_diagonal(d, np.inf)
        knn = np.partition(d, k - 1, axis=1)[:, :k].mean(axis=1)
        return cls(embed, float(np.quantile(knn, fpr)), k, buffer)

    def observe(self, client: str, x: np.ndarray) -> bool:
        """Record one query (C×H×W or 1×C×H×W) of `client`; True when it is flagged (the buffer then restarts)."""
        x = np.asarray(x, dtype=np.float32)
        e = as_array(self.embed(x[None] if x.ndim == 3 else x))[0]
        buf = self.buffers.setdefault(client, deque(maxlen=self.buffer))
        flagged = len(buf) >= self.k and mean_knn_distance(e, np.stack(buf), self.k) < self.threshold
        if flagged:
            buf.clear()
            self.detections[client] = self.detections.get(client, 0) + 1
        buf.append(e)
        return flagged
