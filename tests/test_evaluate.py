"""The evaluation (issue 7): quick mode end to end, Wilson/accuracy bookkeeping, manifest metrics, train_enhanced."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tiny_models
from torch import nn

from service.engine import enhanced_classifier
from service.purify import project
from service.registry import Registry
from service.stats import wilson
from training import data, evaluate, report, train_enhanced

MODELS = Path(__file__).resolve().parent.parent / "models"
CELL = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")


@pytest.fixture(scope="module")
def own_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private tiny registry: the evaluation writes metrics into its manifest."""
    return write_tiny_models(tmp_path_factory.mktemp("eval_models"))


def quick(models: Path, out: Path, *extra: str) -> dict:
    threads = str(torch.get_num_threads())  # run() sets threads; keep the suite's setting
    return evaluate.run(evaluate.parse(["--dataset", "mnist", "--quick", "--models-dir", str(models), "--out",
                                        str(out), "--threads", threads, *extra]))  # fmt: skip


def test_cell_and_wilson_bookkeeping() -> None:
    c = evaluate.Cell(5, 10)
    assert c.acc == 0.5
    lo, hi = c.ci
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert c.fmt() == "0.500 [0.237, 0.763]"
    assert evaluate.Cell(0, 10).ci[0] == 0.0 and evaluate.Cell(10, 10).ci[1] == 1.0
    assert evaluate.Cell(0, 10).ci[1] == pytest.approx(0.2775, abs=1e-4)
    assert evaluate.Cell(7, 9).as_json() == {"k": 7, "n": 9, "acc": 0.7778, "ci95": [round(v, 4) for v in wilson(7, 9)]}
    # the AUC interval contains the estimate and narrows with more samples
    lo1, hi1 = evaluate.auc_ci(0.8, 20, 20)
    lo2, hi2 = evaluate.auc_ci(0.8, 2000, 2000)
    assert lo1 < lo2 < 0.8 < hi2 < hi1


def test_per_image_correctness_counts() -> None:
    class Always(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    ev = evaluate.Evaluation.__new__(evaluate.Evaluation)
    y = torch.tensor([3, 1, 3, 3, 0, 3, 9] * 150)  # 1050 labels: batches of 500 are joined correctly
    ok = ev.correct(Always(), torch.zeros(len(y), 1, 28, 28), y)
    assert ok.dtype == torch.bool and len(ok) == len(y) and int(ok.sum()) == 4 * 150


def test_write_page_keeps_other_datasets(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    evaluate.write_page(page, "mnist", "## mnist\nfirst", quick=False)
    evaluate.write_page(page, "fmnist", "## fmnist\nother", quick=False)
    evaluate.write_page(page, "mnist", "## mnist\nsecond", quick=False)
    text = page.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- results:mnist:start -->") == 1 and text.index("mnist\nsecond") < text.index("fmnist")


def test_quick_mode_end_to_end_on_tiny_models(own_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "results.md"
    doc = quick(own_tiny, out, "--record")
    text = out.read_text()
    assert "QUICK SMOKE RUN" in text and "git commit" in text and "machine" in text and "duration" in text
    for heading in ("Clean accuracy", "White-box L∞", "CW-L2", "Black-box substitute", "ROC AUC"):
        assert heading in text
    assert "(**adaptive**)" in text and "(oblivious)" in text and "not shipped" in text
    assert len(CELL.findall(text)) >= 20
    fig = out.parent / doc["info"]["figure"]
    assert fig.exists() and fig.stat().st_size > 0
    saved = doc  # the page's view of the results tree: the run's config and the newest row per cell
    run = next((own_tiny / "results" / "evaluate-quick" / "mnist").iterdir())
    assert json.loads((run / "config.json").read_text())["quick"] is True and (run / "rows.jsonl").exists()
    assert saved["info"]["quick"] is True and saved["results"]["clean"]["A"]["none"]["cell"]["n"] == 24

    # bookkeeping: the clean cell equals an independent count with the same classifier and images
    reg = Registry(own_tiny)
    xs, ys = data.load_slice("mnist")
    x, y = torch.from_numpy(data.to_float(xs[:24])), torch.from_numpy(ys[:24].astype(np.int64))
    with torch.no_grad():
        k = int((reg.classifier("mnist", "classifier_A")(x).argmax(1) == y).sum())
    clean = saved["results"]["clean"]["A"]["none"]["cell"]
    assert clean["k"] == k and clean["ci95"] == [round(v, 4) for v in wilson(k, 24)]
    # every measured cell is consistent: acc = k / n inside its interval
    for group in ("whitebox", "adaptive"):
        for rows in saved["results"][group].values():
            for row in rows.values():
                for v in row.values():
                    if isinstance(v, dict) and "cell" in v:
                        c = v["cell"]
                        assert c["acc"] == round(c["k"] / c["n"], 4) and c["ci95"][0] <= c["acc"] <= c["ci95"][1]
                        if "defended" in v:  # correct-or-flagged counts at least the correct ones
                            assert v["defended"]["k"] >= c["k"] and v["defended"]["n"] == c["n"]
    # the attacks did something: FGSM on the bare classifier cannot leave more right than clean
    assert saved["results"]["whitebox"]["fgsm"]["A"]["none"]["cell"]["k"] <= k

    # headline metrics reach models/measured.json, which /v1/models serves
    metrics = Registry(own_tiny).get("mnist/classifier_A").metrics
    assert metrics["eval_clean_accuracy"]["none"] == round(k / 24, 4)
    assert set(metrics["eval_clean_accuracy"]) == {"none", "defense-gan", "invert-classify"}
    rob = metrics["eval_fixed_step_min"]["defense-gan"]
    assert rob["linf_eps"] == 0.3 and rob["correct_or_flagged"] >= rob["accuracy"]
    assert "Detect or correct" in text
    assert metrics["evaluation"]["quick"] is True
    assert "eval_detector_auc" in Registry(own_tiny).get("mnist/generator").metrics


def test_projection_cache_reuses_shared_inputs(own_tiny: Path) -> None:
    s = evaluate.quick_settings()
    s.n = 8
    reg = Registry(own_tiny)
    ev = evaluate.Evaluation(reg, "mnist", s)
    a = ev.project(ev.x, s.rec, "clean")
    b = ev.project(ev.x.clone(), s.rec, "clean again")
    assert ev.projections_run == 1 and ev.projections_reused == 1 and torch.equal(a[0], b[0])
    ev.project(ev.x, s.rec.with_(steps=s.rec.steps + 1), "other L")
    assert ev.projections_run == 2


def test_disk_cache_resumes_projections(own_tiny: Path, tmp_path: Path) -> None:
    s = evaluate.quick_settings()
    s.n = 4
    first = evaluate.Evaluation(Registry(own_tiny), "mnist", s, cache_dir=tmp_path)
    a = first.project(first.x, s.rec, "clean")
    second = evaluate.Evaluation(Registry(own_tiny), "mnist", s, cache_dir=tmp_path)
    b = second.project(second.x, s.rec, "clean")
    assert second.projections_run == 0 and second.projections_reused == 1 and torch.equal(a[0], b[0])


def test_disk_cache_is_keyed_by_the_generator_and_encoder(own_tiny: Path, tmp_path: Path) -> None:
    """A retrained generator (or encoder) gets fresh projections, never the old weights' cached ones."""
    s = evaluate.quick_settings()
    s.n = 4
    first = evaluate.Evaluation(Registry(own_tiny), "mnist", s, cache_dir=tmp_path)
    first.project(first.x, s.rec, "clean")
    retrained = write_tiny_models(tmp_path / "retrained", seed=1)  # same slice, other weights
    second = evaluate.Evaluation(Registry(retrained), "mnist", s, cache_dir=tmp_path)
    b = second.project(second.x, s.rec, "clean")
    assert second.projections_run == 1 and second.projections_reused == 0
    assert torch.allclose(b[0], project(second.x, second.G, s.rec, seed=second.seed + 1000).images)
    warm = s.rec.with_(init="encoder")
    assert first.purifier_shas(warm)[1] != second.purifier_shas(warm)[1]


def test_second_run_reuses_every_cached_attack_and_projection(own_tiny: Path, tmp_path: Path) -> None:
    """A resumed run recomputes nothing (attacks, substitutes, projections) and reports the same figures."""
    cache = str(tmp_path / "cache")
    first = quick(own_tiny, tmp_path / "a" / "results.md", "--no-record", "--cache-dir", cache)
    second = quick(own_tiny, tmp_path / "b" / "results.md", "--no-record", "--cache-dir", cache)
    assert first["info"]["projections_run"] > 0 and first["info"]["cached_seconds"] == 0
    assert second["info"]["projections_run"] == 0 and second["info"]["projections_reused"] >= first["info"][
        "projections_run"] and second["info"]["cached_seconds"] > 0  # fmt: skip
    assert "reused from earlier runs" in second["info"]["duration"]
    assert untimed(first["results"]) == untimed(second["results"])


def untimed(v: object) -> object:
    """v without its wall-clock fields."""
    if isinstance(v, dict):
        return {k: untimed(x) for k, x in v.items() if k not in ("seconds", "attack_seconds")}
    return v


@pytest.mark.skipif(not (MODELS / "manifest.json").exists(), reason="no shipped models yet")
def test_quick_mode_on_shipped_models(tmp_path: Path) -> None:
    reg = Registry(MODELS)
    if not reg.has("mnist/classifier_A"):
        pytest.skip("mnist classifier A not shipped yet")
    out = tmp_path / "results.md"
    doc = quick(MODELS, out, "--no-record")
    clean = doc["results"]["clean"]["A"]["none"]["cell"]
    assert clean["acc"] >= 0.9  # a trained model A on 24 MNIST test images
    fgsm = doc["results"]["whitebox"]["fgsm"]["A"]["none"]["cell"]
    assert fgsm["k"] < clean["k"]  # FGSM ε=0.3 hurts the undefended model
    page = out.read_text()
    assert "QUICK SMOKE RUN" in page
    if reg.has("mnist/magnet"):  # the MagNet column: oblivious FGSM, then the reformer, and PGD through it
        magnet = doc["results"]["whitebox"]["fgsm"]["A"]["magnet"]
        assert "cell" in magnet and "defended" in magnet
        pgd_through = doc["results"]["adaptive"]["eot"]["A"]["magnet"]["cell"]
        assert pgd_through["k"] <= magnet["cell"]["k"] + 2  # the exact-gradient attack is no weaker than oblivious
        # the paper's figure beside ours: FGSM on A, MagNet column, 0.191 in Defense-GAN Table 4
        assert re.search(r"\| FGSM ε=0\.3 \| A \| MagNet \| 0\.191 \| " + CELL.pattern, page), page


@pytest.fixture(scope="module")
def shipped_mnist() -> tuple[nn.Module, nn.Module]:
    reg = Registry(MODELS)
    if not (reg.has("mnist/generator") and reg.has("mnist/classifier_A")):
        pytest.skip("the MNIST generator and classifier_A are not shipped")
    G = reg.generator("mnist")
    for p in G.parameters():
        p.requires_grad_(False)
    return G, reg.module("mnist/classifier_A")


def test_overpowered_pairs_are_within_eps_and_disagree(shipped_mnist: tuple[nn.Module, nn.Module]) -> None:
    G, clf = shipped_mnist
    gen = torch.Generator().manual_seed(0)
    x1, x2, found = train_enhanced.overpowered_pairs(clf, G, eps=0.4, pairs=6, steps=120, gen=gen)
    assert found.sum() >= 2, "a standard classifier has range points within L∞ 0.4 that it labels apart"
    with torch.no_grad():
        assert (clf(x1[found]).argmax(1) != clf(x2[found]).argmax(1)).all()
    assert (train_enhanced.pair_distance(x1[found], x2[found], "linf") <= 0.4 + 1e-6).all()
    _, _, none = train_enhanced.overpowered_pairs(clf, G, eps=0.0, pairs=4, steps=5, gen=gen)
    assert not none.any(), "two different latents never make a pair at distance 0"


def test_consistency_hook_steps_only_at_its_interval(shipped_mnist: tuple[nn.Module, nn.Module]) -> None:
    G, clf = shipped_mnist
    args = train_enhanced.parse(["--dataset", "mnist", "--op-every", "3", "--op-steps", "120", "--op-pairs", "6",
                                 "--op-eps", "0.4"])  # fmt: skip
    clf = copy.deepcopy(clf).train()
    for p in clf.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    hook = train_enhanced.consistency_hook(args, G, 1.0)
    before = [p.detach().clone() for p in clf.parameters()]

    def unchanged() -> bool:
        return all(torch.equal(a, b) for a, b in zip(before, clf.parameters(), strict=True))

    assert hook(clf, opt, 4)["pairs"] == 0 and unchanged()
    assert hook(clf, opt, 3)["pairs"] > 0, "every --op-every batches: pairs found"
    assert not unchanged(), "and a consistency step taken"


def test_enhanced_training_resumes_from_init_and_ships(tmp_path: Path) -> None:
    models = write_tiny_models(tmp_path / "models")
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:256], "y_train": ys[:256], "x_test": xs[256:], "y_test": ys[256:]}
    args = train_enhanced.parse(["--dataset", "mnist", "--arch", "A", "--init", "classifier_A", "--steps", "1",
                                 "--batch", "32", "--max-steps", "6", "--op-every", "3", "--op-steps", "3",
                                 "--op-pairs", "2", "--monitor", "32", "--models-dir", str(models), "--run-dir",
                                 str(tmp_path / "runs"), "--log-every", "100"])  # fmt: skip
    model, history = train_enhanced.train(args, arrays)
    assert len(args.losses) == 6 and all(np.isfinite(args.losses)) and history
    train_enhanced.ship(args, model, history)
    reg = Registry(models)  # verifies every sha256, the new files included
    art = reg.get("mnist/classifier_A_enhanced")
    assert art.raw["training"]["method"] == "enhanced-inc" and art.raw["training"]["init"] == "mnist/classifier_A"
    assert enhanced_classifier(reg, "mnist", "classifier_A") == "classifier_A_enhanced"


def test_cheaper_attacker_projection_applies_to_defense_gan_only(own_tiny: Path) -> None:
    s = evaluate.quick_settings()
    s.n, s.attacker_steps, s.attacker_restarts = 4, 3, 1
    ev = evaluate.Evaluation(Registry(own_tiny), "mnist", s)
    rec, warm = ev.attacker_pipeline("A", "rec").cfg, ev.attacker_pipeline("A", "warm").cfg
    assert (rec.steps, rec.restarts, rec.init) == (3, 1, "random")
    assert warm == s.warm


def test_report_prints_the_recorded_robustness(own_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """training.report's robustness table shows what a (non-quick) evaluation recorded, and skips quick runs."""
    quick(own_tiny, tmp_path / "results.md", "--record")
    arts = report.with_measured(own_tiny)
    assert report.evaluation_table(arts) == []  # the recorded run was a quick one
    ev = arts["mnist/classifier_A"]["metrics"]["evaluation"]
    ev["quick"] = False
    lines = [line for line in report.evaluation_table(arts) if line.startswith("| mnist | classifier_A |")]
    rob = arts["mnist/classifier_A"]["metrics"]["eval_fixed_step_min"]["defense-gan"]
    row = next(line for line in lines if "| defense-gan |" in line)
    assert f"{ev['defense-gan']['clean']['acc']:.2f} (24)" in row
    assert f"{rob['accuracy']:.2f} ({rob['worst_attack']})" in row


def test_advgan_tables_measure_each_shipped_row(registry: Registry, tmp_path: Path) -> None:
    """AdvGAN Tables 3/4 on a few images: every shipped row has its clean error and each attack's success (what the
    model gets wrong, recounted here), the paper's figure beside it; rows not trained say so."""
    from training import eval_advgan

    args = eval_advgan.parse(["--n", "12", "--out", str(tmp_path / "advgan.md"), "--no-record", "--threads", "1",
                              "--cache-dir", str(tmp_path / "cache"),
                              "--results-dir", str(tmp_path / "results")])  # fmt: skip
    doc = eval_advgan.run(args)
    assert eval_advgan.run(args)["rows"] == doc["rows"]  # the second run reads FGSM/Opt. from the cache
    rows = {r["classifier"]: r for r in doc["rows"]}
    assert len(rows) == 9 and rows["classifier_A_adv0.3"]["shipped"]
    xs, ys = data.load_slice("mnist")
    x, y = torch.from_numpy(data.to_float(xs[:12])), torch.from_numpy(ys[:12].astype(np.int64))
    for r in doc["rows"]:
        if not r["shipped"]:
            continue
        model = registry.classifier("mnist", r["classifier"])
        with torch.no_grad():
            wrong = int((model(x).argmax(1) != y).sum())
        assert r["clean_error"]["rate"] == round(100 * wrong / 12, 2) and r["clean_error"]["n"] == 12
        for cell in [*r["semi_white_box"].values(), *r["black_box"].values()]:
            assert cell is None or cell["ci"][0] <= cell["rate"] <= cell["ci"][1]
        assert r["black_box"]["AdvGAN"] is not None  # the source's generator (advgan_A) is shipped
    page = (tmp_path / "advgan.md").read_text()
    assert "Table 3" in page and "Table 4" in page and "(paper 4.3)" in page
    runs = sorted((tmp_path / "results" / "eval_advgan" / "mnist").iterdir())
    assert len(runs) == 2 and json.loads((runs[-1] / "config.json").read_text())["n"] == 12, "each run its folder"
    if not rows["classifier_C_pgd0.3"]["shipped"]:
        assert "not trained (`classifier_C_pgd0.3`)" in page


def test_a_columns_run_measures_its_columns_and_reuses_the_others(own_tiny: Path, tmp_path: Path) -> None:
    """`--columns none`: the bare column is measured again, every other column is the earlier run's (read back from
    the page's JSON, no projection run), and the page says which run measured them."""
    page = tmp_path / "results.md"
    first = quick(own_tiny, page)
    assert first["info"]["projections_run"] > 0
    second = quick(own_tiny, page, "--columns", "none")
    assert second["info"]["projections_run"] == 0 and second["info"]["columns"] == ["none"]
    for arch, row in first["results"]["clean"].items():
        assert second["results"]["clean"][arch]["rec"] == row["rec"], "reused as it was"
    assert second["results"]["whitebox"]["fgsm"]["A"]["rec"] == first["results"]["whitebox"]["fgsm"]["A"]["rec"]
    text = page.read_text()
    assert "from the earlier run" in text and first["info"]["command"] in text
    with pytest.raises(SystemExit, match="same n"):
        quick(own_tiny, page, "--columns", "none", "--n", "12")
    before = page.read_text()
    redrawn = quick(own_tiny, page, "--rerender")
    assert redrawn["info"] == second["info"] and page.read_text() == before, "--rerender measures nothing"
    third = quick(own_tiny, page, "--columns", "none", "--sections", "blackbox")  # the other sections kept as they were
    for group in ("whitebox", "adaptive"):
        assert third["results"][group] == second["results"][group], group
    assert third["results"]["blackbox"].keys() == second["results"]["blackbox"].keys()


def test_the_papers_rec_column_is_ours_trained_on_reconstructions_else_orig_marked(registry: Registry) -> None:
    """Defense-GAN-Rec is compared with the classifier trained on reconstructions; where that was not measured,
    Defense-GAN-Orig's figure stands in, marked, and the row says so; Orig is always the original-image one."""

    def c(k: int) -> dict:
        return {"cell": evaluate.Cell(k, 100)}

    results = {"clean": {"A": {"none": c(99)}}, "whitebox": {"fgsm": {"A": {"none": c(20), "rec": c(70)}}},
               "blackbox": {"A/B": {"none": c(60), "rec": c(65), "rectrained": c(93)}}}  # fmt: skip
    lines = evaluate.paper_comparison(SimpleNamespace(ds="mnist", results=results, reg=registry))  # type: ignore[arg-type]
    rows = {tuple(r[:3]): r for r in (line.strip("| ").split(" | ") for line in lines if line.startswith("| "))}
    rec = rows[("substitute FGSM", "A/B", "Defense-GAN-Rec")]
    assert rec[4].startswith("0.930 [") and "(Orig)" not in rec[4] and rec[5] == "yes"
    orig = rows[("substitute FGSM", "A/B", "Defense-GAN-Orig")]
    assert orig[4].startswith("0.650 [") and "the gap is the projection's" in orig[7], (
        "the attack transfers as strongly"
    )
    assert rows[("substitute FGSM", "A/B", "No attack")][5:] == ["yes", "yes"], "within 2 points: no reason given"
    wb = rows[(evaluate.ATTACK_NAMES["fgsm"], "A", "Defense-GAN-Rec")]
    assert wb[4].startswith("0.700 [") and wb[4].endswith("(Orig)") and evaluate.ORIG_STANDS_IN in wb[7]
    assert rows[(evaluate.ATTACK_NAMES["fgsm"], "A", "MagNet")][4] == "not measured"


def test_a_columns_run_writes_its_cells_and_the_page_takes_the_newest(tmp_path: Path) -> None:
    """A run's rows are the cells of its columns; the page's view takes per cell the newest run's row, on the same n
    images, and names the runs it draws on."""
    from training import eval_store, results

    def cells(acc: float) -> dict:
        return {
            "clean": {"A": {"none": {"cell": {"k": int(acc * 10), "n": 10}}, "magnet": {"cell": {"k": 9, "n": 10}}}}
        }

    first = results.start_run("evaluate", "mnist", {"command": "all", "n": 10, "commit": "a"}, tmp_path)
    results.write_rows(first, eval_store.rows_of(cells(0.5), {"none", "magnet"}, {"clean"}))
    second = results.start_run("evaluate", "mnist", {"command": "--columns none", "n": 10, "commit": "b"}, tmp_path)
    results.write_rows(second, eval_store.rows_of(cells(0.7), {"none"}, {"clean"}))
    assert [r["path"] for r in results.rows(second)] == [["A", "none"]], "only the columns it measured"
    view = eval_store.view("mnist", tmp_path)
    assert view is not None and view["results"]["clean"]["A"] == {"none": {"cell": {"k": 7, "n": 10}},
                                                                   "magnet": {"cell": {"k": 9, "n": 10}}}  # fmt: skip
    assert view["info"]["command"] == "--columns none" and view["info"]["reused"][0]["command"] == "all"
    assert eval_store.view("mnist", tmp_path, n=24) is None, "runs on other images are not mixed in"


def test_report_rebuilds_the_pages_from_the_results_tree_byte_identically(tmp_path: Path) -> None:
    """`python -m training.report` on the shipped results tree: docs/results.md, docs/robustness.md, the README's
    tables and models/measured.json as committed, and the same bytes when run twice."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "results").exists():
        pytest.skip("no results tree")
    models = tmp_path / "models"  # the shipped models, with a measured.json of its own
    models.mkdir()
    (models / "manifest.json").write_text((MODELS / "manifest.json").read_text())
    for ds in ("mnist", "fmnist"):
        (models / ds).symlink_to(MODELS / ds)
    shutil.copy(root / "README.md", tmp_path / "README.md")
    built = []
    for k in range(2):
        docs = tmp_path / f"docs{k}"
        report.build(models, root / "results", docs, tmp_path / "README.md")
        built.append({p.name: p.read_bytes() for p in [*docs.iterdir(), tmp_path / "README.md",
                                                       models / "measured.json"] if p.is_file()})  # fmt: skip
    assert built[0] == built[1], "byte-identical when run twice"
    for name in ("results.md", "robustness.md"):
        assert built[0][name] == (root / "docs" / name).read_bytes(), f"docs/{name} is the report's output"
    assert built[0]["README.md"] == (root / "README.md").read_bytes()
    assert built[0]["measured.json"] == (MODELS / "measured.json").read_bytes()
