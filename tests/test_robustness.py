"""Issue 12: adversarial training, the AutoAttack-grade evaluation, its sanity checks, and the defaults served."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import wait_ready, write_tiny_models
from fastapi.testclient import TestClient

from service import nets
from service.api.app import create_app
from service.attacks import Defended, Unrolled
from service.config import Settings
from service.engine import default_classifier, default_defense
from service.purify import ProjectionConfig, freeze
from service.registry import ManifestError, Registry
from training import data, report, results, robustness, robustness_attacks, robustness_page, train_robust
from training.common import ROOT, run_arguments

EPS = 0.3


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = data.load_slice("mnist")
    return torch.from_numpy(data.to_float(xs)), torch.from_numpy(ys.astype(np.int64))


@pytest.fixture(scope="module")
def mlp(digits: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    """A small MLP trained for a few seconds on the slice's first 800 images (about 0.85 on the rest)."""
    torch.manual_seed(0)
    x, y = digits
    model = nets.build_classifier("E")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(15):
        for i in range(0, 800, 100):
            loss = F.cross_entropy(model(x[i : i + 100]), y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return freeze(model)


class Bare(robustness.Pipeline):
    """A robustness.Pipeline around a module, without a registry."""

    def __init__(self, model: torch.nn.Module, sha: str = "test") -> None:
        self.dataset, self.classifier, self.defense, self.weights_sha = "mnist", "tiny", "none", sha
        self.forward, self.ort, self.bpda, self.exact = model, model, None, None


# -- adversarial training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["trades", "pgd"])
def test_robust_training_smoke_loss_falls_and_resumes(method: str, tmp_path: Path) -> None:
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:512], "y_train": ys[:512], "x_test": xs[512:], "y_test": ys[512:]}
    argv = ["--dataset", "mnist", "--method", method, "--eps", "0.3", "--steps", "2", "--batch", "32",
            "--epochs", "4", "--eps-ramp", "0.5", "--lr", "3e-3", "--run-dir", str(tmp_path), "--log-every", "1000",
            "--monitor", "64"]  # fmt: skip
    args = train_robust.parse([*argv, "--max-steps", "30"])
    _, hist = train_robust.train(args, arrays)
    first = args.losses
    saved = {f.name for f in (tmp_path / train_robust.model_name(args)).iterdir()}
    assert saved == {"model.safetensors", "optim.safetensors", "state.json"}, "safetensors and JSON only: no pickle"
    args = train_robust.parse([*argv, "--max-steps", "64"])  # the same command, further: resumes at step 30
    model, hist = train_robust.train(args, arrays)
    assert len(args.losses) == 34, "resumed from the checkpoint, not from scratch"
    assert [seg["from_step"] for seg in args.segments] == [0, 30], "every resume is a segment of its own"
    assert {seg["device"] for seg in args.segments} == {"cpu"} and all(seg["commit"] for seg in args.segments)
    assert np.mean(args.losses[-8:]) < np.mean(first[:8]) - 0.2
    assert hist and {"clean", "fgsm", "pgd20"} <= set(hist[-1]) and not model.training


COMMITTED_RUNS = sorted(p for p in (ROOT / "checkpoints" / "robust").glob("*") if p.is_dir())


@pytest.mark.parametrize("folder", COMMITTED_RUNS or [None], ids=lambda p: p.name if p else "none")
def test_a_committed_checkpoint_resumes_under_its_own_command(folder: Path | None) -> None:
    """A run left in checkpoints/ for a later session: its recorded command, parsed again, points at this folder,
    and the checkpoint loads into that command's network, weight average and optimiser without a pickle."""
    if folder is None:
        pytest.skip("no training run in progress is committed")
    state = json.loads((folder / "state.json").read_text())
    words = shlex.split(state["segments"][-1]["command"])
    assert words[:3] == ["python", "-m", "training.train_robust"], words[:3]
    args = train_robust.parse(words[3:])
    assert (ROOT / args.run_dir / train_robust.model_name(args)).resolve() == folder.resolve()
    spec = data.spec(args.dataset)
    model = nets.build_classifier(args.arch, spec.shape, spec.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = train_robust.WeightAverage(model, args.ema) if args.ema else None
    step, history, _ = train_robust.load_ckpt(folder, model, opt, ema, run_arguments(args, train_robust.RUN_ARGS))
    assert step > 0 and len(history) == len(state["history"]) and len(opt.state) == len(list(model.parameters()))


def test_trades_adversary_stays_in_the_ball(mlp: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits[0][:64]
    adv = train_robust.trades_adversary(mlp, x, EPS, EPS / 4, 5)
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    kl = lambda a: F.kl_div(F.log_softmax(mlp(a), 1), F.softmax(mlp(x), 1), reduction="batchmean")  # noqa: E731
    assert kl(adv) > kl(x + 0.001 * torch.randn_like(x)) + 0.1


def test_msd_stays_in_the_union_and_beats_each_first_step(
    mlp: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Each image ends inside the L∞ or the L2 ball, and no worse than the better single step of either norm."""
    x, y = digits[0][:64], digits[1][:64]
    args = train_robust.parse(["--dataset", "mnist", "--method", "msd", "--eps", "0.3", "--steps", "8"])
    adv = train_robust.msd(mlp, x, y, 0.3, 2.0, args)
    assert bool((robustness.within(adv, x, "linf", 0.3) | robustness.within(adv, x, "l2", 2.0)).all())
    assert adv.min() >= 0 and adv.max() <= 1
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(mlp(x_req), y), x_req)
    ce = lambda a: F.cross_entropy(mlp(a), y, reduction="none")  # noqa: E731
    first = torch.maximum(*(ce(train_robust.ball_step(x, grad, x, e, e * args.alpha_frac, n))
                            for e, n in ((0.3, "linf"), (2.0, "l2"))))  # fmt: skip
    assert bool((ce(adv) >= first - 1e-5).all())
    assert (mlp(adv).argmax(1) == y).float().mean() < (mlp(x).argmax(1) == y).float().mean() - 0.3


# -- the attacks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", robustness.BARE_ATTACKS)
def test_each_reference_attack_breaks_a_plain_model_within_budget(
    attack: str, mlp: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits[0][800:880], digits[1][800:880]
    budget = robustness.Budget(iters=20, square_queries=300)
    adv = Bare(mlp).attack(attack, "linf", EPS, 0, budget)(x, y)
    clean = (mlp(x).argmax(1) == y).float().mean()
    robust = (mlp(adv).argmax(1) == y).float().mean()
    assert robustness.within(adv, x, "linf", EPS).all()
    assert clean > 0.7 and robust < 0.15, (clean, robust)


def test_l2_reference_attack_respects_the_l2_ball(
    mlp: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits[0][800:864], digits[1][800:864]
    adv = Bare(mlp).attack("apgd-ce", "l2", 2.0, 0, robustness.Budget(iters=20))(x, y)
    assert robustness.within(adv, x, "l2", 2.0).all()
    assert (mlp(adv).argmax(1) == y).float().mean() < (mlp(x).argmax(1) == y).float().mean() - 0.3


def test_within_rejects_out_of_budget_images() -> None:
    x = torch.full((2, 1, 28, 28), 0.5)
    adv = x.clone()
    adv[1, 0, 0, 0] = 0.5 + EPS + 0.01
    assert robustness.within(adv, x, "linf", EPS).tolist() == [True, False]


def test_unrolled_projection_matches_the_real_one_and_differentiates_it(registry: Registry) -> None:
    """Forward equal to the projection the service runs; gradient equal to finite differences (float64)."""
    gen, enc = (copy.deepcopy(registry.module(f"mnist/{k}")).double() for k in ("generator", "encoder"))
    clf = registry.classifier("mnist")
    cfg = ProjectionConfig(steps=3, restarts=2, init="encoder")
    x = 0.1 + 0.8 * torch.from_numpy(data.to_float(data.load_slice("mnist")[0][:3])).double()  # off the clamp
    exact, bpda = Unrolled(clf, gen, cfg, encoder=enc, seed=1), Defended(clf, gen, cfg, encoder=enc, seed=1)
    assert torch.allclose(exact.purify(x), bpda.purify(x), atol=1e-6)
    # the unrolled map is piecewise smooth (ReLU kinks in ∇z make z after a step jump, and so does the best-of-R
    # choice): finite differences along most random directions match the gradient, a few straddle a jump
    gen_ = torch.Generator().manual_seed(0)
    w = torch.randn(x.shape, generator=gen_).double()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((exact.purify(xg) * w).sum(), xg)
    h, matches = 1e-6, 0
    for _ in range(5):
        v = torch.randn(x.shape, generator=gen_).double()
        with torch.no_grad():
            fd = float(((exact.purify(x + h * v) - exact.purify(x - h * v)) * w).sum() / (2 * h))
        matches += abs(float((g * v).sum()) - fd) < 1e-4 * abs(fd)
    assert matches >= 3, matches
    (g_bpda,) = torch.autograd.grad((bpda.purify(xg) * w).sum(), xg)
    assert not torch.allclose(g, g_bpda, atol=1e-3)  # straight-through is not the exact gradient


# -- per-image worst case and the sanity checks ---------------------------------------------------------------------
class Scripted(Bare):
    """Attacks that fool fixed images (by index into the evaluated set): the worst case is their union."""

    FOOLS = {"a": {0, 1}, "b": {1, 2}, "c": {5}}

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        super().__init__(model, sha="scripted")
        self.x, self.calls = x, []

    def attack(self, name: str, norm: str, eps: float, seed: int, budget: robustness.Budget):  # noqa: ANN201
        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls.append((name, len(x)))
            adv = x.clone()
            for i, xi in enumerate(x):
                j = int((self.x - xi).flatten(1).abs().sum(1).argmin())
                if j in self.FOOLS[name]:
                    adv[i] = (xi + eps * torch.sign(torch.randn_like(xi))).clamp(0, 1)
            return adv

        return run


def test_worst_case_is_per_image_over_all_attacks_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robustness_attacks, "CACHE", tmp_path)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)

    class Zero(torch.nn.Module):  # label 0 unless the image moved off the original (a scripted attack hit it)
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            moved = (a - x[:, None]).flatten(2).abs().amax(2).amin(0) > 1e-6
            return torch.stack([(~moved).float(), moved.float()], 1).repeat(1, 5)

    p = Scripted(Zero(), x)
    out = robustness.worst_case(p, x, y, "linf", EPS, ("a", "b", "c"), 0, robustness.Budget())
    assert out["after"] == {"a": 6, "b": 5, "c": 4} and out["robust"] == 4
    assert out["robust_flags"] == [False, False, False, True, True, False, True, True]
    assert p.calls == [("a", 8), ("b", 6), ("c", 5)], "each attack runs on the images still robust only"
    p.calls.clear()
    again = robustness.worst_case(p, x, y, "linf", EPS, ("a", "b", "c"), 0, robustness.Budget())
    assert again["robust"] == 4 and p.calls == [], "a rerun reuses the cached per-image results"


def test_sanity_checks_pass_on_a_plain_model(mlp: torch.nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Carlini et al.: accuracy falls to 0 as ε grows, more iterations never raise it, black-box ≤ white-box."""
    x, y = digits[0][800:880], digits[1][800:880]
    s = robustness.sanity(Bare(mlp), x, y, "linf", 0.1, 0, robustness.Budget(iters=30, square_queries=300))
    assert all(s["checks"].values()), s
    assert s["eps_sweep_apgd_ce"]["0"] > 0.7 and s["eps_sweep_apgd_ce"]["0.35"] <= 0.05


def test_choose_default_is_the_most_robust_pipeline_meeting_the_clean_bar() -> None:
    def r(clf: str, defense: str, clean: float, robust: float) -> dict:
        return {"classifier": clf, "defense": defense, "clean": {"accuracy": clean},
                "threats": {"linf:0.3": {"accuracy": robust}}}  # fmt: skip

    results = [r("a", "none", 0.99, 0.0), r("b", "none", 0.97, 0.95), r("c", "none", 0.985, 0.9),
               r("c", "invert-classify", 0.985, 0.8)]  # fmt: skip
    assert robustness.choose_default(results, "mnist") == {"classifier": "mnist/c", "defense": "none"}
    assert robustness.choose_default([r("b", "none", 0.97, 0.95)], "mnist") is None


def test_choose_default_compares_pipelines_on_the_images_they_share() -> None:
    big = {"accuracy": 0.9, "n": 10, "robust_flags": [True] * 5 + [False] * 1 + [True] * 3 + [False]}
    small = {"accuracy": 1.0, "n": 4, "robust_flags": [True] * 4}  # all 4 robust; big has 4 of its first 4 too
    results = [{"classifier": "big", "defense": "none", "clean": {"accuracy": 0.99}, "threats": {"linf:0.3": big}},
               {"classifier": "small", "defense": "none", "clean": {"accuracy": 0.985},
                "threats": {"linf:0.3": small}}]  # fmt: skip
    # paired on the first 4 images: a tie (1.0 each), broken by clean accuracy — not 1.0 (n=4) against 0.9 (n=10)
    assert robustness.choose_default(results, "mnist") == {"classifier": "mnist/big", "defense": "none"}


def test_the_default_rests_on_enough_images_where_any_pipeline_has_them() -> None:
    def r(defense: str, robust: float, n: int) -> dict:
        flags = [i < robust * n for i in range(n)]
        return {"classifier": "classifier_A", "defense": defense, "clean": {"accuracy": 0.97},
                "threats": {"linf:0.0313725": {"accuracy": robust, "n": n, "robust_flags": flags}}}  # fmt: skip

    from training.robustness_protocol import DEFAULT_MIN_N

    bare = r("none", 0.17, DEFAULT_MIN_N)
    assert robustness.choose_default([bare, r("invert-classify", 0.57, 30)], "shapes")["defense"] == "none"
    assert robustness.choose_default([bare, r("invert-classify", 0.57, 100)], "shapes")["defense"] == "invert-classify"
    assert robustness.choose_default([r("none", 0.17, 50), r("invert-classify", 0.57, 30)], "shapes")["defense"] == (
        "invert-classify"
    )  # none has enough: paired on the 30 images both were attacked on


def test_the_union_counts_an_image_only_where_every_attack_of_both_norms_failed() -> None:
    from training.robustness_protocol import union_cell, union_key

    linf = {"robust_flags": [True, True, False, True, True, False]}  # the standard threat: more images
    l2 = {"robust_flags": [True, False, True, True]}
    cell = union_cell({"linf:0.3": linf, "l2:2": l2}, "mnist")
    assert union_key("mnist") == "linf:0.3+l2:2" and union_key("fmnist") == "linf:0.1+l2:1.5"
    assert cell is not None and cell["robust_flags"] == [True, False, False, True] and cell["n"] == 4
    assert cell["accuracy"] == 0.5 and cell["ci"][0] < 0.5 < cell["ci"][1]
    assert union_cell({"linf:0.3": linf, "l2:2": {"accuracy": 0.9}}, "mnist") is None, "no flags, no union"
    assert union_cell({"linf:0.3": linf}, "mnist") is None


def test_the_union_default_is_ranked_on_the_union_not_the_standard_threat() -> None:
    def r(clf: str, inf: list[bool], l2: list[bool]) -> dict:
        cells = {"linf:0.3": {"accuracy": sum(inf) / len(inf), "n": len(inf), "robust_flags": inf},
                 "l2:2": {"accuracy": sum(l2) / len(l2), "n": len(l2), "robust_flags": l2}}  # fmt: skip
        u = robustness.union_cell(cells, "mnist")
        return {"classifier": clf, "defense": "none", "clean": {"accuracy": 0.99},
                "threats": cells | {"linf:0.3+l2:2": u}}  # fmt: skip

    rows = [r("linf_only", [True] * 4, [False, False, False, True]), r("both", [True, True, False, True], [True] * 4)]
    assert robustness.choose_default(rows, "mnist")["classifier"] == "mnist/linf_only"
    assert robustness.choose_default(rows, "mnist", "linf:0.3+l2:2")["classifier"] == "mnist/both"
    packed = [robustness_page.pack_flags(x) for x in rows]
    assert packed[1]["threats"]["l2:2"]["robust_bits"] == "1111" and "robust_flags" not in packed[1]["threats"]["l2:2"]
    assert [robustness_page.unpack_flags(x) for x in packed] == rows, "every cell's flags survive the results tree"


# -- the defaults served --------------------------------------------------------------------------------------------
def models_with_defaults(root: Path, default: dict | None, union: dict | None = None) -> Path:
    """Tiny models plus a second classifier (S), its measured robustness, and the manifest's defaults (`union`: its
    best pipeline under both threats at once)."""
    write_tiny_models(root)
    man = json.loads((root / "manifest.json").read_text())
    a = man["artifacts"]["mnist/classifier_A"]
    man["artifacts"]["mnist/classifier_S"] = {**a, "metrics": {"robustness": {
        "none": {"linf:0.3": {"accuracy": 0.9, "ci": [0.88, 0.92], "n": 1000}},
        "invert-classify": {"linf:0.3": {"accuracy": 0.7, "ci": [0.6, 0.8], "n": 100}}}}}  # fmt: skip
    man["artifacts"]["mnist/classifier_A"]["metrics"] = {"robustness": {
        "none": {"linf:0.3": {"accuracy": 0.0}}, "invert-classify": {"linf:0.3": {"accuracy": 0.02}}}}  # fmt: skip
    if default is not None:
        man["defaults"] = {"mnist": default}
    if union is not None:
        man["union_defaults"] = {"mnist": union}
    (root / "manifest.json").write_text(json.dumps(man))
    return root


def test_default_rule(tmp_path: Path) -> None:
    reg = Registry(models_with_defaults(tmp_path / "m", {"classifier": "mnist/classifier_S", "defense": "none",
                                                          "threat": "linf:0.3"}))  # fmt: skip
    assert default_classifier(reg, "mnist") == "classifier_S" and default_defense(reg, "mnist") == "none"
    assert default_defense(reg, "mnist", "classifier_A") == "invert-classify"  # its own most robust measured
    assert default_defense(reg, "mnist", proxied=True) == "invert-classify"  # a proxy always purifies
    assert default_defense(reg, "mnist", override="defense-gan") == "defense-gan"
    assert default_classifier(reg, "mnist", override="classifier_A") == "classifier_A"
    legacy = Registry(models_with_defaults(tmp_path / "legacy", None))
    assert (default_classifier(legacy, "mnist"), default_defense(legacy, "mnist")) == ("classifier_A", "defense-gan")


def test_a_default_naming_a_missing_classifier_is_refused(tmp_path: Path) -> None:
    root = models_with_defaults(tmp_path / "m", {"classifier": "mnist/classifier_Q", "defense": "none"})
    with pytest.raises(ManifestError, match="classifier_Q"):
        Registry(root)


def test_v1_v2_and_models_serve_the_default_pipeline(tmp_path: Path) -> None:
    root = models_with_defaults(tmp_path / "m", {"classifier": "mnist/classifier_S", "defense": "none",
                                                 "threat": "linf:0.3"})  # fmt: skip
    s = Settings(models_dir=root, device="cpu", default_steps=2, default_restarts=1, encoder_steps=2,
                 max_wait_ms=1.0)  # fmt: skip
    img = np.full((28, 28), 0.5).tolist()
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        body = c.post("/v1/classify", json={"array": img}).json()
        assert body["model"] == "mnist/classifier_S" and body["defense"] == "none"
        body = c.post("/v1/classify", json={"array": img, "model": "mnist/classifier_A"}).json()
        assert body["defense"] == "invert-classify"
        info = c.get("/v1/models").json()
        assert info["datasets"]["mnist"]["default"] == {"classifier": "classifier_S", "defense": "none",
                                                       "threat": "linf:0.3"}  # fmt: skip
        assert info["defaults"]["pipelines"] == {"mnist": {"classifier": "mnist/classifier_S", "defense": "none"}}
        measured = info["datasets"]["mnist"]["measured"]["classifier_S"]["robustness"]
        assert measured["none"]["linf:0.3"] == {"accuracy": 0.9, "ci": [0.88, 0.92], "n": 1000}
        req = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
        r = c.post("/v2/models/mnist-classifier_S/infer", json=req).json()
        assert r["parameters"]["defense"] == "none" and r["parameters"]["purified"] is False


UNION_A = {"classifier": "mnist/classifier_A", "defense": "invert-classify", "threat": "linf:0.3+l2:2"}
STANDARD_S = {"classifier": "mnist/classifier_S", "defense": "none", "threat": "linf:0.3"}


def test_operators_serve_the_union_default_by_name(tmp_path: Path) -> None:
    """MG_DEFAULT_RANKING=union serves the pipeline measured best under both threats at once; /v1/models names it
    whichever ranking is served."""
    root = models_with_defaults(tmp_path / "m", STANDARD_S, UNION_A)
    img = np.full((28, 28), 0.5).tolist()
    for ranking, served in (("standard", ("mnist/classifier_S", "none")),
                            ("union", ("mnist/classifier_A", "invert-classify"))):  # fmt: skip
        s = Settings(models_dir=root, device="cpu", default_steps=2, default_restarts=1, encoder_steps=2,
                     max_wait_ms=1.0, default_ranking=ranking)  # fmt: skip
        with TestClient(create_app(s)) as c:
            wait_ready(c)
            body = c.post("/v1/classify", json={"array": img}).json()
            assert (body["model"], body["defense"]) == served
            d = c.get("/v1/models").json()["defaults"]
            assert d["union"] == {"mnist": {"classifier": "mnist/classifier_A", "defense": "invert-classify"}}
            assert d["ranking"] == ranking and d["pipelines"]["mnist"] == dict(
                zip(("classifier", "defense"), served, strict=True)
            )
    assert default_defense(Registry(root, ranking="union"), "mnist", "classifier_S") == "none", (
        "another classifier keeps its own most robust defense"
    )


def test_a_union_default_naming_a_missing_classifier_is_refused(tmp_path: Path) -> None:
    root = models_with_defaults(tmp_path / "m", STANDARD_S, UNION_A | {"classifier": "mnist/classifier_Q"})
    with pytest.raises(ManifestError, match="union_defaults.*classifier_Q"):
        Registry(root)


def test_shipped_defaults_meet_their_clean_bars(registry: Registry) -> None:
    """Every measured default (models/measured.json, from the results tree) names a shipped classifier whose
    recorded clean accuracy meets the dataset's bar (published, or within 5 points of its best bare classifier)."""
    from training.robustness_protocol import clean_bar

    assert registry.raw_defaults, "training.robustness records a default per evaluated dataset"
    for ds, d in registry.raw_defaults.items():
        entry = registry.get(d["classifier"])
        cell = entry.metrics["robustness"][d["defense"]]
        rows = [{"defense": defense, "clean": cells["clean"]} for c in registry.classifiers(ds)
                for defense, cells in registry.get(f"{ds}/{c}").metrics.get("robustness", {}).items()]  # fmt: skip
        assert cell["clean"]["accuracy"] >= clean_bar(ds, rows)
        assert entry.raw["training"]["method"] in ("pgd", "trades", "max", "enhanced-inc", "standard", "fgsm")
        assert cell[d["threat"]]["n"] >= 100 and "apgd-ce" in " ".join(cell[d["threat"]]["attacks"])


@pytest.mark.parametrize("ranking", ["standard", "union"])
def test_default_pipeline_through_a_real_server(ranking: str, tmp_path: Path) -> None:
    """`python -m service` (uvicorn, loopback) serves the manifest's default when a call names no model or defense:
    the standard threat's, or with MG_DEFAULT_RANKING=union the union's."""
    from test_e2e_http import Server

    root = models_with_defaults(tmp_path / "m", STANDARD_S, UNION_A)
    want = ("mnist/classifier_S", "none") if ranking == "standard" else ("mnist/classifier_A", "invert-classify")
    srv = Server(root, real=False, MG_DEFAULT_RANKING=ranking)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = c.post("/v1/classify", json={"array": np.full((28, 28), 0.5).tolist()}).json()
            assert (body["model"], body["defense"]) == want
            assert c.get("/v1/models").json()["defaults"]["model"] == want[0]
    finally:
        srv.stop()


def test_report_prints_the_readme_rows_from_the_recorded_json() -> None:
    cell = {"accuracy": 0.9, "ci": [0.88, 0.92], "n": 1000}
    doc = {"dataset": "mnist", "results": [
        {"classifier": "classifier_S_x", "defense": "none", "method": "trades",
         "clean": {"accuracy": 0.98, "n": 10000}, "threats": {"linf:0.3": cell}},
        {"classifier": "classifier_B", "defense": "none", "method": "standard",
         "clean": {"accuracy": 0.99, "n": 10000}, "threats": {"linf:0.3": cell}}]}  # fmt: skip
    out = "\n".join(report.robustness_table([doc]))
    assert (
        "| mnist | classifier_S_x | none | trades | 0.9800 (n=10000) | linf:0.3: 0.900 [0.880, 0.920] (n=1000) |" in out
    )
    assert "classifier_B" not in out, "standard classifiers other than the baselines are left to docs/robustness.md"


def test_a_partial_run_replaces_its_rows_and_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--only X`: X's rows take the place of theirs, the other rows stay with the run that measured them, and the
    default is chosen again over all rows, paired on the per-image flags the page keeps."""
    monkeypatch.setattr(robustness, "DOCS", tmp_path / "docs")
    root = models_with_defaults(tmp_path / "m", None)
    reg = Registry(root)
    old_run = {"command": "python -m training.robustness --dataset mnist", "commit": "a", "date": "2026-11-30",
               "machine": "cpu"}  # fmt: skip
    new_run = old_run | {"command": "python -m training.robustness --dataset mnist --only classifier_S",
                         "date": "2026-12-01"}  # fmt: skip

    def row(clf: str, flags: list[bool], info: dict, l2: list[bool] | None = None) -> dict:
        def cell(f: list[bool]) -> dict:
            return {"accuracy": sum(f) / len(f), "ci": [0.0, 1.0], "n": len(f), "robust_flags": f, "robust": sum(f),
                    "after": {"apgd-ce": sum(f)}, "clean_correct": len(f)}  # fmt: skip

        threats = {"linf:0.3": cell(flags)} | ({"l2:2": cell(l2)} if l2 else {})
        union = robustness.union_cell(threats, "mnist")
        return {"classifier": clf, "defense": "none", "method": "trades", "clean": {"accuracy": 0.99, "n": 10000},
                "attacks": ["apgd-ce"], "threats": threats | ({"linf:0.3+l2:2": union} if union else {}),
                "evaluation": info}  # fmt: skip

    first = [row("classifier_A", [True, False, True, False], old_run), row("classifier_S", [False] * 4, old_run)]
    args = robustness.parse(["--dataset", "mnist", "--models-dir", str(root)])
    doc = robustness.publish(args, reg, first, False, old_run, {})
    assert doc["default"]["classifier"] == "mnist/classifier_A" and doc["results"][0]["threats"]["linf:0.3"][
        "robust_bits"] == "1010"  # fmt: skip

    new = row("classifier_S", [True, True, True, False], new_run, l2=[True, False, True, False])
    doc = robustness.publish(args, reg, [new], True, new_run, {})
    runs = sorted((root / "results" / "robustness" / "mnist").iterdir())
    assert len(runs) == 2 and len(results.rows(runs[1])) == 1, "each run its own folder, with the rows it measured"
    assert [r["classifier"] for r in doc["results"]] == ["classifier_A", "classifier_S"]
    assert doc["results"][0]["evaluation"] == old_run and doc["results"][1]["evaluation"] == new_run
    assert doc["default"]["classifier"] == "mnist/classifier_S", "chosen again over the kept and the new rows"
    page = (tmp_path / "docs" / "robustness.md").read_text()
    assert "Rows recorded by these runs" in page and "--only classifier_S" in page and "| 2 |" in page
    assert "- linf:0.3+l2:2 (both at once): `classifier_S` + `none`, 0.500" in page, "measured at both: the union"
    measured = json.loads((root / "measured.json").read_text())  # what /v1/models shows
    assert measured["defaults"]["mnist"]["classifier"] == "mnist/classifier_S"
    assert measured["artifacts"]["mnist/classifier_S"]["robustness"]["none"]["linf:0.3"]["accuracy"] == 0.75
    assert measured["artifacts"]["mnist/classifier_S"]["robustness"]["none"]["linf:0.3+l2:2"]["accuracy"] == 0.5
    assert measured["union_defaults"] == {
        "mnist": {
            "classifier": "mnist/classifier_S",
            "defense": "none",
            "threat": "linf:0.3+l2:2",
            "command": new_run["command"],
        }
    }
