"""The query-attack detector's inner loops, compiled by numba: they run on every public request, on the event loop.

Written with numpy calls they cost ≈ 0.15–0.2 ms per 28×28 image — some 45 calls on arrays of a few hundred
values, each ≈ 1–3 µs of overhead — which took a fifth of the cheapest path's throughput (bench.public); compiled,
the whole check is a few µs. Each function states the numpy expression it computes; tests/test_guard.py checks
them against those expressions. `cache=True` keeps the machine code beside this file (compiled once per install;
the container image compiles it at build time).

uint64 arithmetic wraps modulo 2⁶⁴, as numpy's does.
"""

from __future__ import annotations

import numba
import numpy as np

U64 = np.uint64
SPLITMIX = (U64(0x9E3779B97F4A7C15), U64(0xBF58476D1CE4E5B9), U64(0x94D049BB133111EB))
_S0, _S1, _S2 = SPLITMIX
_R30, _R27, _R31, _R32 = U64(30), U64(27), U64(31), U64(32)


@numba.njit(cache=True, inline="always")
def splitmix64(z: np.uint64) -> np.uint64:
    """The splitmix64 finaliser of one uint64."""
    z = z + _S0
    z = (z ^ (z >> _R30)) * _S1
    z = (z ^ (z >> _R27)) * _S2
    return z ^ (z >> _R31)


@numba.njit(cache=True, inline="always")
def _distinct(a: np.ndarray) -> int:
    """How many distinct values the ascending `a` holds."""
    n = 1 if len(a) else 0
    for j in range(1, len(a)):
        n += a[j] != a[j - 1]
    return n


@numba.njit(cache=True)
def fingerprints(v: np.ndarray, salt: np.ndarray, scale: np.float32, up: np.ndarray, down: np.ndarray,
                 seed: np.uint64, window: int, stride: int, k: int, mult: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rows of `v` (N × L float32, an image flattened channels last) → (N × k uint32 fingerprints, N digests).

    Per row, as numpy would: u = (clip(v, 0, 1) · scale + salt).astype(uint64) (float32 arithmetic);
    hashes = splitmix64(((P[w:] − P[:m]) · down[:m])[::stride] ^ seed) with P = [0, cumsum(u · up)], w = min(window,
    L), m = L − w + 1; the k largest distinct hashes, ascending, zeros in front when fewer; their top 32 bits (a
    nonzero hash whose top bits are 0 becomes 1: 0 means "none"); digest = splitmix64(Σ fp · mult ^ seed)."""
    n, length = v.shape
    w = min(window, length)
    m = length - w + 1
    count = (m + stride - 1) // stride
    fps = np.zeros((n, k), np.uint32)
    digests = np.empty(n, np.uint64)
    prefix = np.empty(length + 1, np.uint64)
    h = np.empty(count, np.uint64)
    zero, one, lo = np.float32(0.0), np.float32(1.0), np.uint64(0)
    for i in range(n):
        acc = lo
        prefix[0] = lo
        for t in range(length):
            x = min(max(v[i, t], zero), one)
            acc += U64(x * scale + salt[t]) * up[t]
            prefix[t + 1] = acc
        for j in range(count):
            s = j * stride
            h[j] = splitmix64(((prefix[s + w] - prefix[s]) * down[s]) ^ seed)
        # the k largest distinct are almost always among the 2k largest: sort those (a partition is O(count)), and
        # all of them only when the 2k hold fewer than k distinct values
        if count > 2 * k:
            tail = np.sort(np.partition(h, count - 2 * k)[count - 2 * k :])
            if _distinct(tail) < k:
                tail = np.sort(h)
        else:
            tail = np.sort(h)
        kept, j = 0, len(tail) - 1
        while j >= 0 and kept < k:
            if kept == 0 or tail[j] != tail[j + 1]:
                top = np.uint32(tail[j] >> _R32)
                if top == 0 and tail[j] != lo:
                    top = np.uint32(1)
                fps[i, k - 1 - kept] = top
                kept += 1
            j -= 1
        total = lo
        for j in range(k):
            total += U64(fps[i, j]) * mult[j]
        digests[i] = splitmix64(total ^ seed)
    return fps, digests


@numba.njit(cache=True, inline="always")
def shared(row: np.ndarray, q: np.ndarray) -> int:
    """How many of `row`'s values are in `q` (both ascending; `q` distinct; zeros never count): the count of
    numpy's `isin(row[row != 0], q).sum()`."""
    i = j = c = 0
    while i < len(row) and j < len(q):
        if row[i] == 0 or row[i] < q[j]:
            i += 1
        elif row[i] > q[j]:
            j += 1
        else:
            c += 1
            i += 1
    return c


@numba.njit(cache=True)
def any_match(rows: np.ndarray, digests: np.ndarray, q: np.ndarray, digest: np.uint64, threshold: int) -> bool:
    """Whether a row of `rows` shares more than `threshold` of `q`'s hashes and is not the same query (digest)."""
    for r in range(len(rows)):  # noqa: SIM110 (numba compiles the loop; any() over a generator it does not)
        if digests[r] != digest and shared(rows[r], q) > threshold:
            return True
    return False


@numba.njit(cache=True)
def stream_matches(table: np.ndarray, mask: np.uint32, fps: np.ndarray, digests: np.ndarray, q: np.ndarray,
                   digest: np.uint64, threshold: int) -> np.ndarray:  # fmt: skip
    """Slots of the stream that share more than `threshold` of `q`'s hashes, other than the same query: the slots
    the buckets of q's hashes point to (`table[q & mask]`) that appear there more than threshold // 2 times,
    counted exactly (`StreamIndex.matches` says why the prefilter loses nothing)."""
    depth = table.shape[1]
    found = np.empty(len(q) * depth, np.int32)
    n = 0
    for h in q:
        if h == 0:
            continue
        b = h & mask
        for d in range(depth):
            s = table[b, d]
            if s >= 0:
                found[n] = s
                n += 1
    found = np.sort(found[:n])
    out = np.empty(n, np.int64)
    c, i = 0, 0
    while i < n:
        j = i
        while j < n and found[j] == found[i]:
            j += 1
        s = found[i]
        if j - i > threshold // 2 and digests[s] != digest and shared(fps[s], q) > threshold:
            out[c] = s
            c += 1
        i = j
    return out[:c]


@numba.njit(cache=True)
def index_add(table: np.ndarray, cursor: np.ndarray, mask: np.uint32, fp: np.ndarray, slot: int) -> None:
    """Point the bucket of each nonzero hash of `fp` at `slot`, in the bucket's next of `depth` places (a ring)."""
    depth = table.shape[1]
    for h in fp:
        if h == 0:
            continue
        b = h & mask
        c = cursor[b]
        table[b, c % depth] = slot
        cursor[b] = (c + 1) % depth


def warm() -> None:
    """Compile (or load from the cache) every kernel now, not on a first request."""
    v, fp = np.zeros((1, 4), np.float32), np.zeros(2, np.uint32)
    ones = np.ones(4, np.uint64)
    fingerprints(v, np.zeros(4, np.float32), np.float32(1.0), ones, ones, U64(0), 2, 1, 2, ones[:2])
    table, rows, digests = np.full((2, 2), -1, np.int32), np.zeros((1, 2), np.uint32), np.zeros(1, np.uint64)
    any_match(rows, digests, fp, U64(0), 1)
    stream_matches(table, np.uint32(1), rows, digests, fp, U64(0), 1)
    index_add(table, np.zeros(2, np.uint8), np.uint32(1), fp, 0)
