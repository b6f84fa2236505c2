"""Blacklight (Li et al., "Blacklight: Scalable Defense for Neural Networks against Query-Based Black-Box Attacks",
USENIX Security 2022): a query-based attack sends many near-identical queries; probabilistic fingerprints find them.

Fingerprint of an image (the authors' code, github.com/Huiying-Li/blacklight, probabilistic_fingerprint.py):
pixels scaled to [0, 255] and flattened (H, W, C order), each shifted by a secret per-pixel salt and quantized with
step 50 (`round=50`); every window of `window` consecutive values (stride 1) is hashed; the `top_k` = 50 largest
distinct hashes are the fingerprint. Two queries match when they share more than `threshold` = 25 of them
(`match_num > threshold`). The authors' example (CIFAR-10) uses window 20; on MNIST a window of 20 often lies
entirely in the blank border, so different digits share those hashes: at window 20, 2.4 % of 2,000 different MNIST
test images matched an earlier query, and with one of three keys 17 of 100 benign clients were stopped (matches
spread through the carry-over and peer rules below); at window 50 none matched and no client was stopped
(bench/guard.py --sections detect), hence window = 50.

Deviations, each for a stated reason:
- the window hash is a keyed rolling 64-bit polynomial (a secret odd base) with a splitmix64 finaliser, computed for
  all windows from one prefix sum (service.guard.kernels, compiled), instead of SHA-256 per window in Python (735
  windows per 28×28 image: ≈ 1 ms, the whole budget, against ≈ 0.015 ms here); the base, the finaliser's key and
  the salt derive from a secret (per process, or shared through the Redis state), so an attacker can neither compute
  a fingerprint nor precompute collisions;
- the salt shifts each pixel's quantization grid by a random fraction of a step with no wrap-around: the authors'
  `(x·255 + salt) % 255` puts black (0) and white (255) in the same bin, which on MNIST (black background, white
  strokes) hides most of the digit;
- the kept hashes are stored as their top 32 bits (a stray equality between two different 32-bit values adds
  ≈ 50·50/2³² ≈ 6·10⁻⁷ to a count of 26 needed), halving memory.

Decision rule (measured on MNIST, bench/guard.py --sections detect; Square L∞ ε = 0.3 against classifier A):
a client's query is *matched* when it matches one of the client's last `history` queries or one of the stream's
last `stream_history` queries (any client); an identical fingerprint (the same image re-sent) is never a match. A
client is detected when `matches` = 10 of its last `history` queries matched (its score), or at once when its query
matches the query of a client already detected. A query that matches another client's query carries that client's
score over (score = own matched count + the largest score carried), so an attacker that spreads its queries over
new identities continues one count instead of starting afresh. Benign: 100 clients × 20 different MNIST test images,
each re-sending a quarter of them (exact, JPEG q75, cropped 1–2 px and resized back, +10 % brightness), three
fingerprint keys: 1.1 % of the brightened re-sends match, nothing else; the highest score of any client is 1 and
none is stopped (nor any of 50 clients × 40 images re-sending half). Square matches from its 2nd query on and is
stopped at its 11th query (p_init 0.05), 18th–25th (p_init 0.3) or 27th–32nd (p_init 0.8). The carry-over and peer
rules make false positives contagious where benign queries match each other (window 20 above): keep the benign
match rate near zero.

Memory (in-process, bench/guard.py --sections memory): ≈ 390 B per stream query (its 50 × 4-byte hashes, digest,
owner and its share of the bucket table: 37 MB preallocated at stream_history 100,000); ≈ 830 B per tracked client
with one query, plus 261 B per further remembered query; at the default caps (20,000 clients, history 32) at most
≈ 20,000 × 9 kB + 37 MB ≈ 220 MB.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from service.config import ClientSettings
from service.guard import kernels
from service.guard.kernels import U64


@dataclass(frozen=True)
class BlacklightConfig:
    quant_step: float = 50.0  # of 255 (the authors' `round`)
    window: int = 50  # values per hashed window (the authors' CIFAR-10 example: 20; MNIST needs 50, see above)
    stride: int = 1
    top_k: int = 50  # hashes kept per query (the authors' `num_hashes_keep`)
    threshold: int = 25  # a match shares more than this many of the top_k hashes (the authors': 25)
    # K: matched queries among a client's last `history` that detect it (the operator's setting is its default)
    matches: int = ClientSettings.model_fields["detector_matches"].default
    depth: int = 8  # recent queries found per hash bucket (in-process: depth slots; Redis: 2·depth records)


@dataclass(frozen=True)
class Verdict:
    """The detector's answer for one request."""

    detected: bool
    reason: str | None = None  # "matches" (its score reached K) | "peer" (matched a detected client's query)
    score: int = 0  # the client's matched queries (own + carried) after this request
    matched: int = 0  # this request's images that matched a stored query


class Fingerprinter:
    """Images → (N × top_k uint32 hashes, ascending, 0-padded; N uint64 digests of the set). Thread-safe."""

    def __init__(self, cfg: BlacklightConfig, key: bytes) -> None:
        """Multipliers, the finaliser's key and the salts all derive from `key`."""
        self.cfg, self.key = cfg, key
        rng = np.random.default_rng(np.frombuffer(hashlib.sha256(key).digest(), dtype=np.uint32))
        top = np.iinfo(np.int64).max
        self.base = int(rng.integers(0, top, dtype=np.int64)) * 2 + 1  # odd: invertible mod 2⁶⁴
        self.inverse = pow(self.base, -1, 2**64)
        self.pows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.digest_mult = rng.integers(0, top, self.cfg.top_k, dtype=np.int64).astype(U64) * U64(2) + U64(1)
        self.seed = U64(rng.integers(0, top, dtype=np.int64))
        self.salts: OrderedDict[int, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def salt(self, length: int) -> np.ndarray:
        """The per-position grid offsets (in steps, [0, 1)) of a flattened image of `length` values; cached."""
        s = self.salts.get(length)
        if s is None:
            seed = hashlib.sha256(self.key + length.to_bytes(8, "little")).digest()
            s = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32)).random(length, dtype=np.float32)
            with self.lock:
                self.salts[length] = s
                while len(self.salts) > 16:
                    self.salts.popitem(last=False)
        return s

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×C×H×W in [0, 1] → (N × top_k uint32 hashes, N digests): the rows flattened channels last, then
        `kernels.fingerprints` (quantized with step quant_step after the salt's shift, windows hashed, top_k kept)."""
        n, cfg = x.shape[0], self.cfg
        v = x if x.shape[1] == 1 else np.moveaxis(x, 1, -1)  # channels last (one channel: already)
        v = np.ascontiguousarray(v, dtype=np.float32).reshape(n, -1)
        up, down = self.powers(v.shape[1])
        return kernels.fingerprints(v, self.salt(v.shape[1]), np.float32(255.0 / cfg.quant_step), up, down,
                                    self.seed, cfg.window, cfg.stride, cfg.top_k, self.digest_mult)  # fmt: skip

    def powers(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(b^t, b^−t) mod 2⁶⁴ for t < length: the rolling hash's weights for a flattened image; cached."""
        cached = self.pows.get(length)
        if cached is None:
            up, down = np.empty(length, U64), np.empty(length, U64)
            p, q = 1, 1
            for t in range(length):
                up[t], down[t] = p, q
                p, q = p * self.base % 2**64, q * self.inverse % 2**64
            cached = (up, down)
            with self.lock:
                self.pows[length] = cached
                while len(self.pows) > 16:
                    self.pows.popitem(last=False)
        return cached


def buckets(n: float) -> int:
    """The power of two ≥ n, at least 1,024: a hash index's bucket count."""
    return 1 << max(int(np.ceil(np.log2(max(n, 1024)))), 10)


class History:
    """One client's last `size` fingerprints (storage grown as they come), their digests, and which matched."""

    __slots__ = ("fps", "digests", "flags", "n", "count", "carried", "size")

    def __init__(self, size: int, k: int) -> None:
        self.size = max(size, 1)
        self.fps = np.zeros((1, k), np.uint32)
        self.digests = np.zeros(1, U64)
        self.flags = bytearray()
        self.n = self.count = self.carried = 0

    @property
    def score(self) -> int:
        return self.count + self.carried

    def matches(self, q: np.ndarray, digest: np.uint64, threshold: int) -> bool:
        m = min(self.n, self.size)
        return kernels.any_match(self.fps[:m], self.digests[:m], q, digest, threshold)

    def push(self, fp: np.ndarray, digest: np.uint64, matched: bool) -> None:
        if self.n < self.size and self.n == len(self.fps):  # grow ×2 up to size
            cap = min(2 * len(self.fps), self.size)
            self.fps = np.concatenate([self.fps, np.zeros((cap - len(self.fps), self.fps.shape[1]), np.uint32)])
            self.digests = np.concatenate([self.digests, np.zeros(cap - len(self.digests), U64)])
        slot = self.n % self.size
        if self.n >= self.size:
            self.count -= self.flags[slot]
            self.flags[slot] = matched
        else:
            self.flags.append(matched)
        self.fps[slot], self.digests[slot] = fp, digest
        self.count += matched
        self.n += 1


class StreamIndex:
    """The last `size` queries of all clients: fingerprints in a ring, found through a direct-mapped table of
    buckets (hash → the `depth` slots that last wrote a hash of that bucket), then counted exactly."""

    def __init__(self, size: int, k: int, depth: int) -> None:
        self.size, self.depth = max(size, 1), depth
        self.fps = np.zeros((self.size, k), np.uint32)
        self.digests = np.zeros(self.size, U64)
        self.owners: list[str | None] = [None] * self.size
        n = buckets(self.size * k / (2 * depth))
        self.mask = np.uint32(n - 1)
        self.table = np.full((n, depth), -1, np.int32)
        self.cursor = np.zeros(n, np.uint8)
        self.n = 0

    def matches(self, q: np.ndarray, digest: np.uint64, threshold: int) -> np.ndarray:
        """Slots of stored queries sharing more than `threshold` hashes with q, other than identical ones. Only
        slots that last wrote at least half as many of q's buckets are counted exactly (a stored query sharing
        more than `threshold` hashes wrote that many buckets; later writers may have pushed some of its entries
        out, not most of them while it is recent)."""
        return kernels.stream_matches(self.table, self.mask, self.fps, self.digests, q, digest, threshold)

    def add(self, fp: np.ndarray, digest: np.uint64, owner: str) -> None:
        slot = self.n % self.size
        self.n += 1
        self.fps[slot], self.digests[slot], self.owners[slot] = fp, digest, owner
        kernels.index_add(self.table, self.cursor, self.mask, fp, slot)
