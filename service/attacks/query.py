"""The query-attack suite: the API attacker (an HTTP client that can act as many client identities, per-image
query accounting, the reference attacks driven through it, the judge) and the benign stream. Used by
`training.blackbox` (attacks over HTTP) and `service.audit` (any allow-listed model server, bare and guarded).

    client = Client(url, "user-model")                       # POST /v2/models/{name}/infer, binary FP32 N×C×H×W
    ledger = Ledger(x, y, "linf", 0.3)                       # per image: queries, first success, refusals
    oracle = Oracle(client, Identities(book.take(100)), ledger, eot=4, transform=oars("linf", 0.3), classes=10)
    x_adv = square(oracle, x, y, "linf", 0.3, queries=10_000)   # torchattacks.Square through an nn.Module wrapper
    x_adv = hop_skip_jump(oracle, x, y, "l2", 2.0, queries=10_000)  # ART's HopSkipJump on the labels alone
    adv, info = transfer(oracle, seeds, x, y, 0.3, rounds=6) # Papernot et al.'s substitute, labelled over HTTP
    sub, info = train_on_answers(oracle, seeds, rounds=6)      # the substitute alone; then per threat:
    adv = transfer_from(sub, x, y, "l2", 2.0)                  # {"pgd-l2": ...} (L∞: {"fgsm", "pgd"})
    ok = judge(referee, candidates(ledger, {"square": x_adv}, True), y, repeats=10, address=...)

Accounting: every row the attacker sends is mapped to the image it attacks (the nearest original in the threat's
norm: each row Square sends lies within ε of exactly one; HopSkipJump attacks one image at a time and names it),
counted, and checked: its first *success* is the first query whose row lies inside the threat ball and was answered
with a wrong label. A 429 rotates to the next identity (the first refusal is recorded per image); when every identity
is refused the attack stops (`Stopped`) and each image keeps the query count at which that happened. Everything the
attacker learns comes from HTTP answers. Images are float32 N×C×H×W in [0, 1] of any dataset's shape (its
`service.datasets.DatasetSpec`): the attacks follow the images they are given and the `classes` the oracle is told.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torchattacks
from torch import nn

from service import oip
from service.attacks.fgsm import fgsm
from service.attacks.pgd import pgd, pgd_l2
from service.attacks.substitute import Substitute, train_substitute
from service.datasets import MNIST
from service.guard.streams import RESEND_KINDS, resend
from service.stats import wilson

ABSTAIN = -1  # the label of an abstained answer
MAX_ROWS = 64  # images per request (the service's max_batch_images: 28×28 gray images; fewer of larger ones)
EPS_SLACK = 1e-4  # float32 rounding at the ball's edge
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


class Stopped(Exception):
    """Every identity of the attacker was refused (429): the attack cannot go on."""


class OutOfTime(Exception):
    """The attack run used its wall-clock allowance (a safety net: the figures say it ran out)."""


class ImageDone(Exception):
    """The image being attacked (one at a time) has its success, or has used its query budget."""


class Refused(Exception):
    """One request answered 429 (rate, budget or the stateful detector)."""

    def __init__(self, message: str, retry_after: str | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Answer:
    """What the API said about N rows: labels always (−1 abstained); the scores the output policy allows."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None  # N×K (an upstream's logits arrive as their softmax)
    top1: np.ndarray | None = None

    @property
    def policy(self) -> str:
        return "probabilities" if self.probabilities is not None else "top1" if self.top1 is not None else "label"

    def log_scores(self, y_fallback: np.ndarray, classes: int = MNIST.num_classes) -> np.ndarray:
        """N×K log-scores for a score-based attack: log p (all probabilities); under `top1` p on the label and
        (1 − p)/(K − 1) elsewhere; under `label` a one-hot. An abstained row scores as its true label (the attacker
        learns nothing from it), which Square reads as "not fooled"."""
        labels = np.where(self.labels == ABSTAIN, y_fallback, self.labels)
        if self.probabilities is not None:
            p = self.probabilities.astype(np.float64)
        else:
            top = self.top1.astype(np.float64) if self.top1 is not None else np.ones(len(labels))
            p = np.repeat(((1 - top) / (classes - 1))[:, None], classes, axis=1)
            p[np.arange(len(labels)), labels] = top
        abstained = self.labels == ABSTAIN
        p[abstained] = np.eye(classes)[y_fallback[abstained]]
        return np.log(np.clip(p, 1e-6, 1.0)).astype(np.float32)


def parse_answer(resp: oip.InferResponse) -> Answer:
    """The public profile's outputs (`labels`, `top1`, `probabilities`) or a proxied upstream's (`label`, `logits`)."""
    out = {t.name: t.data for t in resp.outputs}
    labels = out.get("labels", out.get("label"))
    if labels is None:
        raise ValueError(f"the answer has no labels: outputs {sorted(out)}")
    probs = out.get("probabilities")
    if probs is None and "logits" in out:
        z = out["logits"].astype(np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
    return Answer(labels.astype(np.int64).reshape(-1), probs, out.get("top1"))


class Client:
    """POST /v2/models/{name}/infer with binary FP32 inputs; one caller, an identity per request (X-Forwarded-For,
    believed by the service from a trusted proxy). `api_key` and `params` are the inspect scope's; `max_rows`: the
    images one request may hold (the service's cap for the model's dataset, `service.request.image_cap`)."""

    max_rows: int = MAX_ROWS

    def __init__(self, url: str, name: str, api_key: str | None = None, params: dict | None = None,
                 timeout_s: float = 900.0, max_rows: int = MAX_ROWS) -> None:  # fmt: skip
        self.url, self.name, self.params, self.max_rows = url.rstrip("/"), name, dict(params or {}), max_rows
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx_client(timeout_s)
        self.requests = 0

    def infer(self, x: np.ndarray, address: str | None = None) -> Answer:
        """One request of ≤ max_rows rows (N×C×H×W in [0, 1]); `Refused` on 429, RuntimeError on any other error."""
        req = oip.InferRequest([oip.Tensor.from_numpy("input", np.ascontiguousarray(x, dtype=np.float32))],
                               parameters=self.params)  # fmt: skip
        body, headers = oip.encode_request(req, binary_inputs=True)
        headers = {**headers, **self.headers, **({"X-Forwarded-For": address} if address else {})}
        r = self.http.post(f"{self.url}/v2/models/{self.name}/infer", content=body, headers=headers)
        self.requests += 1
        if r.status_code == 429:
            raise Refused(_error_of(r), r.headers.get("Retry-After"))
        if r.status_code != 200:
            raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {_error_of(r)}")
        return parse_answer(oip.decode_response(r.content, r.headers.get(oip.HEADER_LENGTH)))

    def close(self) -> None:
        self.http.close()


def httpx_client(timeout_s: float):  # noqa: ANN201 - httpx is imported here only
    import httpx

    return httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))


def _error_of(r: object) -> str:
    try:
        return str(r.json().get("error", r.text))  # type: ignore[attr-defined]
    except ValueError:
        return r.text[:200]  # type: ignore[attr-defined]


class AddressBook:
    """Fresh client addresses from the IPv6 documentation prefix 2001:db8::/32 (RFC 3849), each in its own /48 so
    no subnet grouping merges two; never handed out twice, so no attack inherits another's refusals."""

    def __init__(self, start: int = 1) -> None:
        self.next = start

    def take(self, n: int) -> list[str]:
        out = [f"2001:db8:{k:x}::1" for k in range(self.next, self.next + n)]
        self.next += n
        if self.next > 0xFFFF:
            raise RuntimeError("AddressBook: out of /48s")
        return out


@dataclass
class Identities:
    """The attacker's client identities, one at a time; the next after a 429 (`Stopped` when none is left)."""

    addresses: list[str]
    current: int = 0
    refusals: list[str] = field(default_factory=list)  # each refusal's message

    @property
    def address(self) -> str:
        if self.current >= len(self.addresses):
            raise Stopped(self.refusals[-1] if self.refusals else "no identity left")
        return self.addresses[self.current]

    def refuse(self, message: str) -> None:
        self.refusals.append(message)
        self.current += 1
        if self.current >= len(self.addresses):
            raise Stopped(message)


class Ledger:
    """Per attacked image: queries sent, the first success, the first refusal and the stop, and the rows to judge."""

    def __init__(self, x: np.ndarray, y: np.ndarray, norm: str, eps: float) -> None:
        self.x, self.y, self.norm, self.eps = x.astype(np.float32), y.astype(np.int64), norm, eps
        self.flat = torch.from_numpy(self.x.reshape(len(x), -1))
        n = len(x)
        self.queries = np.zeros(n, np.int64)
        self.first_success = np.full(n, -1, np.int64)  # 1-based query count of the first success, −1 none
        self.first_refusal = np.full(n, -1, np.int64)  # query count when an identity was first refused
        self.stopped_at = np.full(n, -1, np.int64)  # query count when the last identity was refused
        self.success_row: dict[int, np.ndarray] = {}
        self.last_row = self.x.copy()  # the last in-ball row sent per image
        self.owner: int | None = None  # the image being attacked, when the attack names it

    def owners(self, rows: np.ndarray) -> np.ndarray:
        """The image each row attacks: the named one, else the nearest original in the threat's norm (a row inside
        exactly one original's ball is nearest to that one; in L2 two similar images can swap)."""
        if self.owner is not None:
            return np.full(len(rows), self.owner)
        p = float("inf") if self.norm == "linf" else 2.0
        d = torch.cdist(torch.from_numpy(rows.reshape(len(rows), -1).astype(np.float32)), self.flat, p=p)
        return d.argmin(1).numpy()

    def inside(self, rows: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """Per row: inside [0, 1] and the threat ball of its original."""
        return within(rows, self.x[owners], self.norm, self.eps)

    def record(self, rows: np.ndarray, owners: np.ndarray, labels: np.ndarray) -> None:
        ok = self.inside(rows, owners)
        for row, i, label, valid in zip(rows, owners, labels, ok, strict=True):
            self.queries[i] += 1
            if not valid:
                continue
            self.last_row[i] = row
            if label != ABSTAIN and label != self.y[i] and self.first_success[i] < 0:
                self.first_success[i] = self.queries[i]
                self.success_row[i] = row.copy()

    def refused(self, images: np.ndarray, stopped: bool) -> None:
        """An identity was refused while attacking `images` (all: every image still in play)."""
        first = images[self.first_refusal[images] < 0]
        self.first_refusal[first] = self.queries[first]
        if stopped:
            left = images[self.stopped_at[images] < 0]
            self.stopped_at[left] = self.queries[left]

    def stopped_before_success(self) -> np.ndarray:
        """Per image: the attacker was stopped before its first success (or it never had one and was stopped)."""
        stopped = self.stopped_at >= 0
        return stopped & ((self.first_success < 0) | (self.first_success > self.stopped_at))


def within(rows: np.ndarray, x0: np.ndarray, norm: str, eps: float) -> np.ndarray:
    d = (rows - x0).reshape(len(rows), -1).astype(np.float64)
    size = np.abs(d).max(1) if norm == "linf" else np.sqrt((d * d).sum(1))
    flat = rows.reshape(len(rows), -1)
    return (size <= eps + EPS_SLACK) & (flat.min(1) >= -EPS_SLACK) & (flat.max(1) <= 1 + EPS_SLACK)


def project(rows: np.ndarray, x0: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """Rows clipped into [0, 1] ∩ the ε-ball around their originals."""
    d = np.clip(rows, 0, 1) - x0
    if norm == "linf":
        d = np.clip(d, -eps, eps)
    else:
        size = np.sqrt((d.reshape(len(d), -1) ** 2).sum(1)).reshape(-1, 1, 1, 1)
        d = d * np.minimum(1.0, eps / np.maximum(size, 1e-12))
    return np.clip(x0 + d, 0, 1).astype(np.float32)


def oars(norm: str, eps: float, shift: int = 1, brightness: float = 0.1, noise: float = 0.03) -> Transform:
    """A small random transform of each query, as OARS (Feng et al., CCS 2023) samples queries so a stateful
    detector's similarity hashes stop matching: translate by up to `shift` px (every channel alike), scale brightness
    by 1 ± `brightness` (per image), add N(0, `noise`²) noise to every value (each channel its own); then back into
    the threat ball (every query stays a valid candidate). Rows of any C×H×W."""

    def transform(rows: np.ndarray, x0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty_like(rows)
        for k, row in enumerate(rows):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            out[k] = np.roll(row, (int(dy), int(dx)), axis=(-2, -1))
        out = out * rng.uniform(1 - brightness, 1 + brightness, (len(rows), 1, 1, 1))
        out = out + rng.normal(0, noise, rows.shape)
        return project(out.astype(np.float32), x0, norm, eps)

    return transform


class Oracle:
    """The attacker's view of the API: rows in, answers out, over rotating identities; EOT sends `eot` copies of each
    row in the same request (independent random starts) and averages them; `transform` randomizes each copy.
    `classes`: how many the API answers (the dataset's; what label-only and top-1 answers are spread over); `rows`:
    rows per request (an HTTP `Client`'s max_rows; a client that splits its requests itself, the audit's, keeps 64)."""

    def __init__(self, client: Client, identities: Identities, ledger: Ledger | None, eot: int = 1,
                 transform: Transform | None = None, seed: int = 0, classes: int = MNIST.num_classes,
                 rows: int = MAX_ROWS) -> None:  # fmt: skip
        self.client, self.ids, self.ledger = client, identities, ledger
        self.eot, self.transform, self.classes, self.rows = eot, transform, classes, rows
        self.rng = np.random.default_rng(seed)
        self.budget: int | None = None  # per-image query cap of an attack that names its image
        self.unowned = 0  # queries not attributed to an attacked image (a substitute's training set)
        self.deadline = float("inf")  # time.monotonic() after which the run stops (OutOfTime)

    def ask(self, rows: np.ndarray) -> tuple[Answer, np.ndarray]:
        """Answers to `rows` (EOT copies averaged: the mean score, the majority label) and each row's owner."""
        owners = self.ledger.owners(rows) if self.ledger is not None else np.full(len(rows), -1)
        self._check_budget(len(rows))
        sent = np.repeat(rows, self.eot, axis=0)
        sent_owners = np.repeat(owners, self.eot)
        if self.transform is not None and self.ledger is not None:
            sent = self.transform(sent, self.ledger.x[sent_owners], self.rng)
        parts = [self._send(sent[i : i + self.rows], sent_owners[i : i + self.rows])
                 for i in range(0, len(sent), self.rows)]  # fmt: skip
        return _average(parts, len(rows), self.eot), owners

    def _check_budget(self, rows: int) -> None:
        """ImageDone when the named image (HopSkipJump's) has succeeded or would go over its query budget."""
        named = self.ledger.owner if self.ledger is not None else None
        if self.budget is None or named is None:
            return
        if self.ledger.first_success[named] >= 0 or self.ledger.queries[named] + rows * self.eot > self.budget:
            raise ImageDone

    def _send(self, rows: np.ndarray, owners: np.ndarray) -> Answer:
        if time.monotonic() > self.deadline:
            raise OutOfTime
        while True:
            try:
                a = self.client.infer(rows, self.ids.address)
            except Refused as e:
                self._refused(str(e), owners)
                continue
            if self.ledger is not None:
                self.ledger.record(rows, owners, a.labels)
            else:
                self.unowned += len(rows)
            return a

    def _refused(self, message: str, owners: np.ndarray) -> None:
        last = self.ids.current + 1 >= len(self.ids.addresses)
        if self.ledger is not None:
            alive = np.unique(owners) if self.ledger.owner is not None else np.arange(len(self.ledger.x))
            self.ledger.refused(alive, stopped=last)
        self.ids.refuse(message)

    def log_scores(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().cpu().numpy().astype(np.float32)
        a, owners = self.ask(rows)
        y = self.ledger.y[owners] if self.ledger is not None else np.zeros(len(rows), np.int64)
        return torch.from_numpy(a.log_scores(y, self.classes)).to(x.device)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        a, owners = self.ask(rows.astype(np.float32))
        y = self.ledger.y[owners] if self.ledger is not None else a.labels
        return np.where(a.labels == ABSTAIN, y, a.labels)


def _average(parts: list[Answer], n: int, k: int) -> Answer:
    """One answer per row from its k copies: mean probabilities / top-1, the most frequent label."""
    labels = np.concatenate([p.labels for p in parts]).reshape(n, k)
    voted = np.array([np.bincount(r[r >= 0]).argmax() if (r >= 0).any() else ABSTAIN for r in labels])
    probs = [p.probabilities for p in parts]
    tops = [p.top1 for p in parts]
    mean_p = np.concatenate(probs).reshape(n, k, -1).mean(1) if all(p is not None for p in probs) else None
    mean_t = np.concatenate(tops).reshape(n, k).mean(1) if all(t is not None for t in tops) else None
    if mean_p is not None:
        voted = np.where(voted == ABSTAIN, ABSTAIN, mean_p.argmax(1))
    return Answer(voted, mean_p, mean_t)


class HttpModel(nn.Module):
    """An nn.Module whose forward sends the batch over HTTP and returns log-scores (for torchattacks)."""

    def __init__(self, oracle: Oracle) -> None:
        super().__init__()
        self.oracle = oracle
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # torchattacks reads the device from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.oracle.log_scores(x)


# -- the attacks ---------------------------------------------------------------------------------------------------
NORMS = {"linf": "Linf", "l2": "L2"}


class LastIterateSquare(torchattacks.Square):
    """torchattacks' Square returning its last iterate x_best for every image, fooled in the end or not (the judge
    resubmits it: a randomized pipeline may be fooled by it on another try), without the final check query."""

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.init_hyperparam(x)
        torch.random.manual_seed(self.seed)
        return self.attack_single_run(x, y)[1]


def square(oracle: Oracle, x: np.ndarray, y: np.ndarray, norm: str, eps: float, queries: int,
           seed: int = 0) -> np.ndarray:  # fmt: skip
    """torchattacks.Square (Andriushchenko et al. 2020; margin loss, p_init 0.8, one restart) with at most `queries`
    queries per image (EOT: queries / k iterations). `Stopped` propagates: the ledger's rows are then the result."""
    iters = max(queries // oracle.eot - 1, 1)  # the first query scores the random start
    atk = LastIterateSquare(HttpModel(oracle), norm=NORMS[norm], eps=eps, n_queries=iters, seed=seed)
    with _attack_rng(seed):
        return atk(torch.from_numpy(x), torch.from_numpy(y)).numpy()


def hop_skip_jump(oracle: Oracle, x: np.ndarray, y: np.ndarray, norm: str, eps: float, queries: int,
                  seed: int = 0, max_iter: int = 64) -> np.ndarray:  # fmt: skip
    """ART's HopSkipJump (Chen et al. 2020), untargeted, on the labels alone, one image at a time with a budget of
    `queries` per image (ART's defaults otherwise: 100 initial gradient evaluations, up to 10,000). It minimizes the
    distance with no ε: an image is broken at the first query inside the ball answered wrongly, where its attack
    ends (the attacker has what it came for). Images of `x`'s C×H×W, labels among the oracle's classes."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    def predict(rows: np.ndarray) -> np.ndarray:
        return np.eye(oracle.classes, dtype=np.float32)[oracle.labels(rows.astype(np.float32))]

    clf = BlackBoxClassifier(predict, input_shape=x.shape[1:], nb_classes=oracle.classes, clip_values=(0.0, 1.0))
    atk = HopSkipJump(clf, norm=2 if norm == "l2" else np.inf, max_iter=max_iter, verbose=False, batch_size=MAX_ROWS)
    out = x.copy()
    ledger = oracle.ledger
    assert ledger is not None
    oracle.budget = queries
    try:
        for i in range(len(x)):
            ledger.owner = i
            np.random.seed(seed + i)  # ART draws from numpy's global generator
            with contextlib.suppress(ImageDone):
                out[i] = atk.generate(x[i : i + 1], y[i : i + 1])[0]
    finally:
        ledger.owner, oracle.budget = None, None
    return out


@contextlib.contextmanager
def _attack_rng(seed: int) -> Iterator[None]:
    """The global torch/numpy generators seeded for one attack and restored after it."""
    state, np_state = torch.random.get_rng_state(), np.random.get_state()
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
        np.random.set_state(np_state)


def transfer(oracle: Oracle, seeds: np.ndarray, x: np.ndarray, y: np.ndarray, eps: float, rounds: int,
             seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:  # fmt: skip
    """Papernot et al.'s substitute (architecture E, Jacobian augmentation from `seeds`, λ = 0.1) trained on the
    API's labels, then FGSM and PGD-40 (L∞ ε, α = 0.01) on it, transferred. If the attacker is stopped while
    labelling, the substitute is trained with the rounds it completed (its labels so far are kept)."""
    sub, info = train_on_answers(oracle, seeds, rounds, seed)
    return transfer_from(sub, x, y, "linf", eps, seed), info


def train_on_answers(oracle: Oracle, seeds: np.ndarray, rounds: int, seed: int = 0) -> tuple[Substitute, dict]:
    """The substitute of `transfer` (built for the seeds' C×H×W and the oracle's classes), trained on the oracle's
    labels (each distinct row asked once), and what it cost. `Stopped` before the seeds were labelled propagates;
    stopped later, it keeps the rounds it completed."""
    labelled: dict[bytes, int] = {}

    def ask(rows: torch.Tensor) -> torch.Tensor:
        arr = rows.detach().cpu().numpy().astype(np.float32)
        keys = [r.tobytes() for r in arr]
        new = [k for k, key in enumerate(keys) if key not in labelled]
        if new:
            got = oracle.labels(arr[new])
            labelled.update({keys[k]: int(v) if v != ABSTAIN else 0 for k, v in zip(new, got, strict=True)})
        return torch.tensor([labelled[key] for key in keys])

    for r in range(rounds, 0, -1):  # each retry relabels nothing: training is deterministic for a seed
        try:
            sub = train_substitute(ask, torch.from_numpy(seeds), arch="E", rounds=r, seed=seed, classes=oracle.classes)
            break
        except Stopped:
            continue
    else:
        raise Stopped("stopped before the substitute's seed images were labelled")
    info = {"rounds": r, "oracle_queries": len(labelled), "training_points": sub.training_points,
            "agreement": round(sub.agreement, 4)}  # fmt: skip
    return sub, info


def transfer_from(sub: Substitute, x: np.ndarray, y: np.ndarray, norm: str, eps: float,
                  seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """White-box attacks on the substitute, to transfer: L∞ FGSM and PGD-40 (α = 0.01); L2 PGD-40 (α = ε/16)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    if norm == "l2":
        return {"pgd-l2": pgd_l2(sub.model, xt, yt, eps=eps, alpha=eps / 16, generator=gen).numpy()}
    return {"fgsm": fgsm(sub.model, xt, yt, eps=eps).numpy(),
            "pgd": pgd(sub.model, xt, yt, eps=eps, generator=gen).numpy()}  # fmt: skip


def judge(client: Client, pairs: list[tuple[int, np.ndarray]], y: np.ndarray, repeats: int, address: str,
          rows: int = MAX_ROWS) -> np.ndarray:  # fmt: skip
    """Per image: every one of `repeats` answers to each of its candidate rows (image index, row) is its true label
    or an abstention (worst of `repeats`: a randomized pipeline must hold on every try); `rows` per request."""
    ok = np.ones(len(y), bool)
    if not pairs:
        return ok
    owners = np.repeat([i for i, _ in pairs], repeats)
    sent = np.repeat(np.stack([r for _, r in pairs]), repeats, axis=0)
    labels = np.concatenate([client.infer(sent[k : k + rows], address).labels
                             for k in range(0, len(sent), rows)])  # fmt: skip
    wrong = (labels != y[owners]) & (labels != ABSTAIN)
    np.logical_and.at(ok, owners, ~wrong)
    return ok


def candidates(ledger: Ledger, outputs: dict[str, np.ndarray], finished: bool) -> list[tuple[int, np.ndarray]]:
    """Per image the rows the attacker would submit: its first success, each output inside the ball, and (stopped,
    or nothing else to offer) the last row it sent inside the ball."""
    pairs = []
    for i in range(len(ledger.x)):
        rows = [ledger.success_row[i]] if i in ledger.success_row else []
        rows += [o[i] for o in outputs.values() if ledger.inside(o[i : i + 1], np.array([i]))[0]]
        if not finished or not rows:
            rows.append(ledger.last_row[i])
        seen: set[bytes] = set()
        for r in rows:
            if r.tobytes() not in seen:
                seen.add(r.tobytes())
                pairs.append((i, r.astype(np.float32)))
    return pairs


# -- the benign stream ---------------------------------------------------------------------------------------------
def benign_plans(n: int, clients: int, resend_fraction: float, seed: int) -> list[list[tuple[int, str]]]:
    """Each client's sequence of (image index, variant kind): the n images split among `clients` (each sends its
    own), about `resend_fraction` of them re-sent once as a random variant at a random later place in its sequence."""
    rng = np.random.default_rng(seed)
    plans = []
    for g in np.array_split(rng.permutation(n), min(clients, n)):
        seq = [(int(i), "original") for i in g]
        for i in g[rng.random(len(g)) < resend_fraction]:
            kind = str(rng.choice(RESEND_KINDS))
            seq.insert(int(rng.integers(1, len(seq) + 1)), (int(i), kind))
        plans.append(seq)
    return plans


def benign_stream(url: str, served: str, x: np.ndarray, y: np.ndarray, book: AddressBook, seed: int,
                  clients: int = 200, resend_fraction: float = 0.3, workers: int = 8) -> dict:  # fmt: skip
    """`clients` clients share the images (float32 N×C×H×W in [0, 1]); each sends its own one per request, re-sending
    about `resend_fraction` of them (a random variant each: `service.guard.streams.resend`, gray or colour) at random
    places in its sequence. Requests of different clients run concurrently."""
    plans = benign_plans(len(x), clients, resend_fraction, seed)
    clients = len(plans)
    addresses = book.take(clients)
    local = threading.local()

    def run_client(k: int) -> tuple[bool, list[tuple[int, int]]]:
        if not hasattr(local, "client"):
            local.client = Client(url, served)
        crng, got, refused = np.random.default_rng(seed + 1 + k), [], False
        for i, kind in plans[k]:
            img = x[i : i + 1] if kind == "original" else resend(x[i], kind, crng)[None]
            try:
                label = int(local.client.infer(img, addresses[k]).labels[0])
            except Refused:
                refused, label = True, -2
            if kind == "original":
                got.append((i, label))
        return refused, got

    t0 = time.time()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run_client, range(clients)))
    secs = time.time() - t0
    stopped = sum(r for r, _ in results)
    answers = [(i, lab) for _, got in results for i, lab in got]
    correct = int(sum(lab == y[i] for i, lab in answers))
    sent = sum(len(p) for p in plans)
    return {"images": len(x), "clients": clients, "requests": sent, "resent": sent - len(x),
            "clients_stopped": stopped, "stopped_fraction": round(stopped / clients, 4),
            "stopped_ci": [round(v, 4) for v in wilson(stopped, clients)],
            "accuracy": round(correct / len(x), 4), "accuracy_ci": [round(v, 4) for v in wilson(correct, len(x))],
            "refused_images": int(sum(lab == -2 for _, lab in answers)), "seconds": round(secs, 1),
            "images_per_s": round(sent / secs, 1)}  # fmt: skip
