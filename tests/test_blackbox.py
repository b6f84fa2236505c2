"""Sanity checks of the API attacker's evaluation (training.blackbox): a real KServe upstream serving the shipped
classifier A and a real `python -m service` under the public profile, attacked over HTTP at tiny n.

- more queries never raise the figure (and the budget matters at all);
- a client-fixed seed (inspect scope) reproduces the same answers, so the same figure, twice;
- label-only answers under HopSkipJump do no better than scores under Square beyond what sampling explains;
- the accounting itself (rows mapped to their images, first success, identities rotated, the stop) on a fake API;
- the colour set `shapes` end to end: its pipelines and threats, 3×32×32 queries within its per-request cap, Square,
  HopSkipJump and transfer judged, and its page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
pytest.importorskip("torchattacks", reason="needs torchattacks (scripts/setup.sh --dev)")
pytest.importorskip("art", reason="needs the [dev] extra: adversarial-robustness-toolbox")

from service.attacks.query import (  # noqa: E402
    AddressBook,
    Answer,
    Client,
    Identities,
    Ledger,
    Oracle,
    Refused,
    Stopped,
    square,
)
from service.datasets import MNIST  # noqa: E402
from service.registry import Registry  # noqa: E402
from training import data  # noqa: E402
from training.blackbox import (  # noqa: E402
    INSPECT_KEY,
    Attack,
    Budget,
    Deployment,
    Pipeline,
    attacks_for,
    label_verdict,
    merge,
    page_path,
    pipelines_for,
    render,
    run_attack,
    start_service,
    start_upstream,
    summarize,
)
from training.robustness_protocol import THREATS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SCORES = Pipeline("t-scores", "A", "a-scores", {"defense": "none", "output": "probabilities"}, True, False, "fast")
LABELS = Pipeline("t-labels", "A, label only", "a-labels", {"defense": "none", "output": "label"}, True, False, "fast")
DGAN_PROFILE = {"defense": "defense-gan", "steps": 4, "restarts": 2, "output": "probabilities"}
DGAN = Pipeline("t-dgan", "A + Defense-GAN L=4 R=2", "a-dgan", DGAN_PROFILE, True, True, "slow")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The upstream and one public service (detector off) serving the three pipelines under their names."""
    logs = tmp_path_factory.mktemp("blackbox-logs")
    upstream = start_upstream(MODELS / "mnist" / "classifier_A.onnx", logs / "upstream.log")
    try:
        site = Deployment(MNIST, MODELS, upstream.url)
        mg = start_service([SCORES, LABELS, DGAN], False, site, logs / "service.log", warm_up=False)
        try:
            yield mg.url
        finally:
            mg.stop()
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    """The committed slice's first images (the job's held-out images need data/, which CI does not have)."""
    xs, ys = data.load_slice("mnist")
    return {"x": data.to_float(xs[:24]), "y": ys[:24].astype(np.int64), "seeds": data.to_float(xs[900:930])}


def figure(url: str, p: Pipeline, a: Attack, b: Budget, sets: dict, client: Client | None = None) -> dict:
    """One attack run and its figures; `client` (a seeded inspect caller) attacks and judges."""
    client = client or Client(url, p.served)
    r = run_attack(a, p, b, False, client, client, sets, AddressBook(), seed=0)
    return r | {"summary": summarize(r)}


def test_more_queries_never_raise_the_figure(server: str, sets: dict) -> None:
    a = Attack("square", "linf", 0.3)
    runs = [figure(server, SCORES, a, Budget(n=12, full_n=12, square=q), sets) for q in (4, 60, 400)]
    defended = [r["summary"]["defended"] for r in runs]
    assert defended == sorted(defended, reverse=True), defended
    assert defended[0] > defended[-1], defended  # the budget matters: the check can tell the queries apart
    for r in runs:  # every image got at most its budget, and a first success only inside it
        q, first = np.array(r["images"]["queries"]), np.array(r["images"]["first_success"])
        assert (q <= r["queries_cap"]).all() and (first <= q).all()


def test_a_fixed_seed_reproduces_the_figure(server: str, sets: dict) -> None:
    pipeline = {"defense": "defense-gan", "steps": 4, "restarts": 2}
    x = sets["x"][:6]
    unseeded = Client(server, DGAN.served, api_key=INSPECT_KEY, params=pipeline)
    assert not np.array_equal(unseeded.infer(x).probabilities, unseeded.infer(x).probabilities)  # random starts
    b = Budget(n=4, full_n=4, square=12)
    runs = []
    for _ in range(2):
        seeded = Client(server, DGAN.served, api_key=INSPECT_KEY, params=pipeline | {"seed": 11})
        assert np.array_equal(seeded.infer(x).probabilities, seeded.infer(x).probabilities)
        runs.append(figure(server, DGAN, Attack("square", "linf", 0.3), b, sets, seeded))
    for key in ("queries", "first_success", "correct"):
        assert runs[0]["images"][key] == runs[1]["images"][key], key
    assert runs[0]["summary"] == runs[1]["summary"] and runs[0]["repeats"] == 10


def test_label_only_is_no_better_than_scores_beyond_sampling(server: str, sets: dict) -> None:
    b = Budget(n=10, full_n=10, square=1000, hsj_n=10, hsj=1000)
    hsj = figure(server, LABELS, Attack("hsj", "linf", 0.3), b, sets)["summary"]
    sq = figure(server, SCORES, Attack("square", "linf", 0.3), b, sets)["summary"]
    assert label_verdict(hsj, sq).startswith("no better than sampling explains"), (hsj, sq)
    # where label-only does look better, the page says why
    better = {**hsj, "ci": [0.9, 1.0], "accuracy": 1.0, "n": 10}
    worse = {**sq, "ci": [0.0, 0.3], "accuracy": 0.0, "n": 10}
    assert "not evidence that hiding scores defends" in label_verdict(better, worse)


class FakeApi(Client):
    """An API without HTTP: labels by the image's mean brightness; refuses (429) after `allow` requests per identity."""

    def __init__(self, allow: int) -> None:
        self.allow, self.seen, self.requests = allow, {}, 0

    def infer(self, x: np.ndarray, address: str | None = None) -> Answer:
        self.seen[address] = self.seen.get(address, 0) + 1
        if self.seen[address] > self.allow:
            raise Refused("query-based attack detected", "3600")
        labels = (x.reshape(len(x), -1).mean(1) > 0.2).astype(np.int64)
        return Answer(labels, np.eye(10, dtype=np.float32)[labels])


def test_accounting_maps_rows_rotates_identities_and_records_the_stop() -> None:
    x = np.zeros((3, 1, 28, 28), np.float32)
    x[1] += 0.9
    x[2, 0, :14] = 0.9  # three images far apart (L2), each row below within ε of exactly one
    y = np.zeros(3, np.int64)
    ledger = Ledger(x, y, "linf", 0.3)
    api = FakeApi(allow=2)
    oracle = Oracle(api, Identities(AddressBook().take(2)), ledger)
    rows = np.concatenate([x + 0.05, x + 0.1])
    oracle.labels(rows[:3])
    assert ledger.queries.tolist() == [1, 1, 1]
    assert ledger.first_success.tolist() == [-1, 1, 1]  # images 1 and 2 answered 1 ≠ 0 inside the ball
    oracle.labels(rows[3:])
    oracle.labels(rows[:3])  # identity 1 refused here; identity 2 answers
    assert ledger.first_refusal.tolist() == [2, 2, 2] and ledger.queries.tolist() == [3, 3, 3]
    with pytest.raises(Stopped):
        for _ in range(3):
            oracle.labels(rows[:3])
    assert ledger.stopped_at.tolist() == [4, 4, 4]
    assert ledger.stopped_before_success().tolist() == [True, False, False]
    # Square through the wrapper stops at the ledger's first success and never leaves the ball
    ledger = Ledger(x[:1], y[:1], "linf", 0.3)
    adv = square(Oracle(FakeApi(allow=10**6), Identities(["2001:db8::1"]), ledger), x[:1], y[:1], "linf", 0.3, 50)
    assert np.abs(adv - x[:1]).max() <= 0.3 + 1e-6 and ledger.queries[0] <= 50


def test_merge_replaces_the_rerun_pipelines_and_drops_a_former_default() -> None:
    def cell(pipeline: str, run: str) -> dict:
        return {"pipeline": pipeline, "detector": False, "run": run}

    old_info = {"command": "first", "date": "d1", "commit": "c1", "minutes": 30}
    old = {"info": old_info, "runs": [old_info],
           "cells": [cell("A", "first"), cell("A (classifier_A, the default)", "first")]}  # fmt: skip
    new_key = "A (classifier_A + invert-classify, the default)"
    info = {"command": "second", "date": "d2", "commit": "c2", "minutes": 9}
    doc = merge(old, {"info": info, "cells": [{"pipeline": new_key, "detector": False}]}, [new_key], ["A", new_key])
    assert [(c["pipeline"], c["run"]) for c in doc["cells"]] == [("A", "first"), (new_key, "second")]
    assert [r["command"] for r in doc["runs"]] == ["first", "second"]


# -- a colour dataset ----------------------------------------------------------------------------------------------
SHAPES_RUNS = (("a", Attack("square", "linf", 8 / 255)), ("a", Attack("hsj", "l2", 0.5)),
               ("a", Attack("transfer", "linf", 8 / 255)), ("s", Attack("square", "l2", 0.5)))  # fmt: skip


class Recorder(Client):
    """A public caller that keeps the shape of every request it sends."""

    def __init__(self, url: str, name: str, max_rows: int) -> None:
        super().__init__(url, name, max_rows=max_rows)
        self.sent: list[tuple[int, ...]] = []

    def infer(self, x: np.ndarray, address: str | None = None) -> Answer:
        self.sent.append(x.shape)
        return super().infer(x, address)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, str, dict[str, Pipeline]]]:
    """The shapes job's deployment, and one public service (detector off; its URL) serving its pipelines A (scores,
    proxied to the upstream's `shapes-nchw`) and its default "s"."""
    logs, reg = tmp_path_factory.mktemp("blackbox-shapes"), Registry(MODELS, verify=False)
    pipelines = {p.id: p for p in pipelines_for(reg, "shapes")}
    served = {"a": pipelines["a"], "s": pipelines["s"]}
    upstream = start_upstream(reg.get("shapes/classifier_A").path(MODELS, "onnx"), logs / "upstream.log", "shapes")
    try:
        site = Deployment(reg.spec("shapes"), MODELS, upstream.url)
        mg = start_service(list(served.values()), False, site, logs / "service.log", warm_up=False)
        try:
            yield site, mg.url, served
        finally:
            mg.stop()
    finally:
        upstream.stop()


def test_shapes_pipelines_and_threats_follow_the_dataset() -> None:
    pipelines = pipelines_for(Registry(MODELS, verify=False), "shapes")
    assert [p.id for p in pipelines] == ["a", "a-label", "a-dgan50", "a-dgan100", "a-invert", "s"]
    s = pipelines[-1]  # its default is classifier A bare: the service's own model, not the proxy
    assert s.key == "A (classifier_A, the default)" and s.served == "shapes-classifier_A" and not s.proxied
    assert THREATS["shapes"] == (("linf", 8 / 255), ("l2", 0.5))
    runs = {(a.name, a.norm, a.eps) for a in attacks_for(pipelines[0], False, THREATS["shapes"])}
    assert runs == {("square", "linf", 8 / 255), ("hsj", "linf", 8 / 255), ("square", "l2", 0.5), ("hsj", "l2", 0.5),
                    ("transfer", "linf", 8 / 255)}  # fmt: skip


def test_shapes_is_attacked_in_its_own_shape_and_judged(shapes: tuple[Deployment, str, dict[str, Pipeline]]) -> None:
    site, url, pipelines = shapes
    xs, ys = data.load_slice("shapes")  # the committed slice: data/ is not there in CI
    sets = {"x": data.to_float(xs[:20]), "y": ys[:20].astype(np.int64), "seeds": data.to_float(xs[900:916])}
    assert sets["x"].shape[1:] == site.spec.shape == (3, 32, 32) and site.rows == 16  # 64 gray images' worth
    b = Budget(n=20, full_n=20, square=1000, hsj_n=2, hsj=150, seeds=16, rounds=2)  # A: first success ~130 queries
    runs = []
    for pid, attack in SHAPES_RUNS:
        client = Recorder(url, pipelines[pid].served, site.rows)
        r = run_attack(attack, pipelines[pid], b, False, client, client, sets, AddressBook(), 0, classes=10)
        runs.append(r | {"summary": summarize(r)})
        assert {x[1:] for x in client.sent} == {(3, 32, 32)} and max(x[0] for x in client.sent) == site.rows, pid
        q, first, correct = (np.array(r["images"][k]) for k in ("queries", "first_success", "correct"))
        if attack.name != "transfer":  # within the budget, every image attacked
            assert (q <= r["queries_cap"]).all() and (q > 0).all() and (first <= q).all(), pid
            # resubmitted to a deterministic pipeline: wrong exactly where the attack saw its first success
            assert correct.tolist() == (first < 0).tolist(), (pid, first, correct)
    square, hsj, transfer, _ = runs
    assert square["summary"]["defended"] < square["n"]  # Square on the proxied scores breaks colour images
    assert hsj["n"] == 2 and min(hsj["images"]["queries"]) > 50  # HopSkipJump ran on the labels of 3×32×32 images
    assert transfer["substitute"]["training_points"] == 32 == transfer["substitute_queries"]  # 16 seeds, 2 rounds
    own = Client(url, pipelines["s"].served, max_rows=site.rows).infer(sets["x"][:16])
    proxied = Client(url, pipelines["a"].served, max_rows=site.rows).infer(sets["x"][:16])
    assert own.policy == "top1" and proxied.probabilities is not None and proxied.probabilities.shape == (16, 10)
    assert (own.labels == proxied.labels).mean() >= 0.9  # classifier A twice: the service's own and the upstream's
    a = pipelines["a"]  # its cell: a run at each threat
    cells = [{"pipeline": a.key, "profile": a.profile, "detector": False, "benign": None, "budget": asdict(b),
              "runs": runs[:3]}]  # fmt: skip
    info = {"command": "test", "date": "today", "commit": "x", "dataset": "shapes",
            "images": {"pool": "the slice", "benign": "none"}}  # fmt: skip
    page = render({"info": info, "cells": cells})
    assert page.startswith("# Black-box evaluation through the API (shapes)\n") and "| L∞ 8/255: every attack" in page
    assert "## L∞ ε = 8/255" in page and "## L2 ε = 0.5" in page and "ε = 0.3" not in page and "ε = 2" not in page
    assert page_path(Path("docs"), "shapes").name == "blackbox-shapes.md"
    assert page_path(Path("docs"), "mnist").name == "blackbox.md"
