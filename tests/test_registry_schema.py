"""The registry: the manifest's typed schema checked at start-up, artifacts and calibrations apart from results
(`models/measured.json`), and the one detector lookup keyed by the projection's (start, L, R)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS, write_tiny_models

from service.attacks import Reformed
from service.purify import ProjectionConfig
from service.registry import MagNetDetector, ManifestError, Registry, check_entry


def test_the_shipped_manifest_holds_artifacts_and_calibrations_only() -> None:
    path = MODELS / "manifest.json"
    if not path.exists():
        pytest.skip("no shipped models")
    doc = json.loads(path.read_text())
    # about 1.07 KB per artifact (66 artifacts, 70 KB, with the datasets' specs); results would swell it
    assert path.stat().st_size < 1_200 * len(doc["artifacts"]), "artifacts and calibrations: results live in results/"
    assert "defaults" not in doc, "the served default is a setting; the measured one is in models/measured.json"
    for key, entry in doc["artifacts"].items():
        check_entry(key, entry)
        assert "metrics" not in entry and "history" not in entry.get("training", {}), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("files"), "lacks files"),
        (lambda e: e["files"]["weights"].update(sha256="abc"), "64 hex digits"),
        (lambda e: e.update(kind="widget"), "kind 'widget'"),
        (lambda e: e.update(command=["python"]), "command is list"),
        (lambda e: e["detector"]["random"].update(threshold="high"), "threshold is str"),
        (lambda e: e["detector"]["random"].pop("fpr"), "needs a threshold and an fpr"),
        (lambda e: e.update(detector_grid={"encoder:5:1": {"threshold": 0.1, "fpr": 0.05, "steps": 5.5}}), "steps"),
    ],
)  # fmt: skip
def test_a_malformed_entry_is_refused_at_start_up(tmp_path: Path, change: object, message: str) -> None:
    root = write_tiny_models(tmp_path)
    man = json.loads((root / "manifest.json").read_text())
    change(man["artifacts"]["mnist/generator"])  # type: ignore[operator]
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match=message):
        Registry(root)


def test_measured_figures_and_the_measured_default_come_from_measured_json(tmp_path: Path) -> None:
    root = write_tiny_models(tmp_path)
    (root / "measured.json").write_text(json.dumps({
        "artifacts": {"mnist/classifier_A": {"clean_test_accuracy": 0.5}, "mnist/gone": {"x": 1}},
        "defaults": {"mnist": {"classifier": "mnist/classifier_A", "defense": "none", "threat": "linf:0.3"},
                     "fmnist": {"classifier": "fmnist/classifier_Q", "defense": "none"}}}))  # fmt: skip
    reg = Registry(root)
    assert reg.get("mnist/classifier_A").metrics == {"clean_test_accuracy": 0.5}
    assert reg.defaults["mnist"].classifier == "classifier_A" and "fmnist" not in reg.defaults, (
        "a measured default naming an artifact not shipped is not served"
    )


def test_one_detector_lookup_keyed_by_start_steps_and_restarts(tmp_path: Path) -> None:
    """A calibration holds at its own (start, L, R) only; where a grid point and a start's main entry share it, the
    grid point (set on more images) is the one applied — by the service and by every evaluation alike."""
    root = write_tiny_models(tmp_path)
    man = json.loads((root / "manifest.json").read_text())
    gen = man["artifacts"]["mnist/generator"]
    gen["detector"] = {"encoder": {"threshold": 0.2, "fpr": 0.05, "n": 150, "steps": 25, "restarts": 1}}
    gen["detector_grid"] = {"encoder:25:1": {"threshold": 0.3, "fpr": 0.05, "n": 1000, "steps": 25, "restarts": 1}}
    (root / "manifest.json").write_text(json.dumps(man))
    reg = Registry(root)
    assert reg.detector("mnist", "encoder", 25, 1).threshold == 0.3  # type: ignore[union-attr]
    assert reg.detector_calibration("mnist", "encoder")["threshold"] == 0.3, "the start's main L, R: the one applied"
    assert reg.detector("mnist", "encoder", 5, 1) is None and reg.detector("mnist", "encoder", 25, 2) is None
    mse = torch.tensor([0.1, 0.25, 0.35])
    det, flags, note = reg.verdict("mnist", ProjectionConfig(init="encoder", steps=25, restarts=1), mse)
    assert det is not None and flags.tolist() == [False, False, True] and note is None
    det, flags, note = reg.verdict("mnist", ProjectionConfig(init="encoder", steps=5, restarts=1), mse.numpy())
    assert det is None and flags is None and "L=5, R=1" in (note or "")
    _, flags, _ = reg.verdict("mnist", ProjectionConfig(init="encoder", steps=25, restarts=1), mse.numpy())
    assert isinstance(flags, np.ndarray), "numpy MSEs (the service's) flag the same way"


def test_magnet_flags_where_either_detector_passes_its_threshold() -> None:
    """`MagNetDetector.flag` is the rule `Reformed.excess` > 0 encodes: the worse of the two scores over its
    threshold."""

    class Magnet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0.5

        def scores(self, x: torch.Tensor, reformed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1).mean(1), x.flatten(1).amax(1)

    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    det = MagNetDetector(0.5, 0.9)
    pipeline = Reformed(torch.nn.Identity(), Magnet(), (det.threshold_i, det.threshold_ii))
    flags = det.flag(*Magnet().scores(x))
    assert 0 < int(flags.sum()) < len(x)
    assert torch.equal(flags, pipeline.excess(x) > 0)
