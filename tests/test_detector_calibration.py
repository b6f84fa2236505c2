"""The detector is tied to the projection it was calibrated for: start, L and R.

- every (start, L, R) the service uses by default has a calibration, for every shipped dataset;
- every shipped calibration's false-positive rate on held-out clean images is within ±0.03 of its target: recorded
  by the command that made it, and measured again here on the committed slice where that is cheap;
- anywhere else `flagged` is null and the answer says why (v1 and v2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_ready, write_tiny_models
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.purify import Detector, ProjectionConfig, project
from service.registry import Registry, grid_key
from service.stats import wilson
from training import data

TOLERANCE = 0.03  # the bound on |clean false-positive rate − target|
MEASURE_COST = 5  # re-measured here where L × R ≤ this (5 k generator passes per calibration, ~10 s on 2 cores)
MEASURE_N = 1000  # held-out clean images: the whole committed slice, other restart noise than the command used


def _shipped(registry: Registry) -> list[str]:
    return [ds for ds in registry.datasets() if registry.detector_calibrations(ds)]


def test_every_default_projection_has_a_calibration_on_target(registry: Registry) -> None:
    """The (start, L, R) the service projects with by default each have a calibration whose false-positive rate,
    measured on held-out clean images by the command that made it, is within ±0.03 of its target."""
    s = Settings()
    defaults = [("random", s.default_steps, s.default_restarts), ("encoder", s.encoder_steps, s.encoder_restarts)]
    assert _shipped(registry), "no shipped generator has a detector calibration"
    for ds in _shipped(registry):
        for init, steps, restarts in defaults:
            if init == "encoder" and registry.encoder(ds) is None:
                continue
            cal = registry.detector_calibration(ds, init, steps, restarts)
            assert cal is not None, (ds, init, steps, restarts)
            assert cal["held_out_fpr"] is not None, f"{ds} {init} L={steps}: no held-out FPR recorded"
            assert abs(cal["held_out_fpr"] - cal["fpr"]) <= TOLERANCE, (ds, init, steps, restarts, cal["held_out_fpr"])
    rows = [f"{ds} {c['init']} L={c.get('steps')} R={c.get('restarts')}: held-out FPR {c['held_out_fpr']} "
            f"{'on target' if c['on_target'] else 'OFF target: not used'}"
            for ds in _shipped(registry) for c in registry.detector_calibrations(ds)]  # fmt: skip
    print("\n".join(rows))


def _cheap(registry: Registry) -> list[tuple[str, dict]]:
    return [(ds, c) for ds in _shipped(registry) for c in registry.detector_calibrations(ds)
            if "steps" in c and c["steps"] * c["restarts"] <= MEASURE_COST]  # fmt: skip


@pytest.fixture(scope="module")
def cheap(registry: Registry) -> list[tuple[str, dict]]:
    found = _cheap(registry)
    if not found:
        pytest.skip("no shipped calibration cheap enough to measure here")
    return found


def test_false_positive_rate_measured_on_held_out_images(registry: Registry, cheap: list[tuple[str, dict]]) -> None:
    """Project clean slice images (never in a calibration set) at each cheap calibration's own start, L and R, with
    restart noise of its own: the fraction flagged is within ±0.03 of the target."""
    torch.set_num_threads(1)
    out = []
    for ds, cal in cheap:
        G, enc = registry.generator(ds), registry.encoder(ds) if cal["init"] == "encoder" else None
        cfg = ProjectionConfig(steps=cal["steps"], restarts=cal["restarts"], init=cal["init"])
        x = torch.from_numpy(data.to_float(data.load_slice(ds)[0][:MEASURE_N]))
        mse = torch.cat([project(x[i : i + 200], G, cfg, encoder=enc, seed=777 + i).mse for i in range(0, len(x), 200)])
        det = registry.detector(ds, cal["init"], cal["steps"], cal["restarts"])
        assert isinstance(det, Detector)
        k = int(det.flag(mse).sum())
        lo, hi = wilson(k, len(x))
        key = grid_key(cal["init"], cal["steps"], cal["restarts"])
        out.append(f"{ds} {key}: {k / len(x):.3f} [{lo:.3f}, {hi:.3f}]")
        assert abs(k / len(x) - det.fpr) <= TOLERANCE, out[-1]
        if "test_fpr" in cal and cal.get("test_n") == len(x) and cal["init"] == "encoder" and cal["restarts"] == 1:
            assert k / len(x) == pytest.approx(cal["test_fpr"], abs=2e-3), "the recorded figure reproduces"
    print("\n".join(out))


# -- null, and why, where no calibration applies ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Tiny models whose detector is calibrated at random L=2 R=1 (main) and, on the grid, encoder L=1 R=1 (and
    random L=3 R=2, whose held-out false-positive rate is off target: not used)."""
    root = write_tiny_models(tmp_path_factory.mktemp("calibrated"))
    man = json.loads((root / "manifest.json").read_text())
    gen = man["artifacts"]["mnist/generator"]
    gen["detector"] = {"random": {"threshold": 0.05, "fpr": 0.05, "n": 10, "steps": 2, "restarts": 1}}
    gen["detector_grid"] = {"encoder:1:1": {"threshold": 0.05, "fpr": 0.05, "n": 10, "steps": 1, "restarts": 1},
                            "random:3:2": {"threshold": 0.05, "fpr": 0.05, "n": 10, "steps": 3, "restarts": 2,
                                           "test_fpr": 0.2, "test_n": 10}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(man))
    s = Settings(models_dir=Path(root), device="cpu", default_steps=2, default_restarts=1, encoder_steps=1,
                 max_steps=5, max_restarts=2, max_wait_ms=1.0)  # fmt: skip
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


IMAGE = {"array": np.full((28, 28), 0.5).tolist()}


@pytest.mark.parametrize(
    ("defense", "steps", "restarts", "calibrated"),
    [("defense-gan", 2, 1, True), ("defense-gan", 3, 1, False), ("defense-gan", 2, 2, False),
     ("defense-gan", 3, 2, False), ("invert-classify", 1, 1, True), ("invert-classify", 2, 1, False)],
)  # fmt: skip
def test_v1_flags_only_where_calibrated_and_says_why(client: TestClient, defense: str, steps: int, restarts: int,
                                                    calibrated: bool) -> None:  # fmt: skip
    params = {"defense": defense, "steps": steps, "restarts": restarts, "seed": 0}
    for route in ("/v1/classify", "/v1/detect"):
        r = client.post(route, json={**IMAGE, **params})
        assert r.status_code == 200, r.text
        body = r.json()
        flagged = (body.get("predictions") or body.get("detections"))[0]["flagged"]
        assert (flagged is not None) is calibrated and (body["threshold"] is not None) is calibrated
        note = body["detector_note"]
        if calibrated:
            assert note is None
        else:
            start = "random" if defense == "defense-gan" else "encoder"
            assert f"{start} start at L={steps}, R={restarts}" in note
            assert "random L=2 R=1" in note and "encoder L=1 R=1" in note, "it names the calibrated settings"
            assert "random L=3 R=2" not in note.split("calibrated:")[1], "an off-target calibration is not offered"
            assert ("flags 0.200 of held-out clean images" in note) is ((steps, restarts) == (3, 2))


def test_v2_says_why_in_its_parameters(client: TestClient) -> None:
    x = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    for steps, calibrated in ((2, True), (4, False)):
        body = {"inputs": [tensor], "parameters": {"defense": "defense-gan", "steps": steps, "restarts": 1}}
        p = client.post("/v2/models/mnist-classifier_A/infer", json=body).json()["parameters"]
        assert ("flagged" in p) is calibrated and ("detector_note" in p) is not calibrated
        if not calibrated:
            assert "random start at L=4, R=1" in p["detector_note"]


def test_v1_models_lists_every_calibration(client: TestClient) -> None:
    det = client.get("/v1/models").json()["datasets"]["mnist"]["detector"]
    assert det["random"]["steps"] == 2 and det["grid"]["encoder:1:1"] == {
        "threshold": 0.05,
        "fpr": 0.05,
        "n": 10,
        "steps": 1,
        "restarts": 1,
        "on_target": True,
    }
    assert det["grid"]["random:3:2"]["on_target"] is False and det["grid"]["random:3:2"]["test_fpr"] == 0.2


def test_the_calibrating_command_records_a_grid_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """training.calibrate_detector on tiny models: the threshold is the held-out quantile, the FPR measured on the
    slice is recorded, and the service then uses the point (or, off target, does not)."""
    from training import calibrate_detector

    root = write_tiny_models(tmp_path / "models")
    xs, ys = data.load_slice("mnist")  # a stand-in test set: the slice, then its images again as "test[1000:]"
    monkeypatch.setattr(calibrate_detector.data, "load", lambda ds: {"x_test": np.concatenate([xs, xs[:200]])})
    calibrate_detector.main(["--dataset", "mnist", "--grid", "encoder:1:1", "--n", "100", "--n-test", "100",
                             "--models-dir", str(root), "--record"])  # fmt: skip
    reg = Registry(root)
    cal = reg.get("mnist/generator").raw["detector_grid"]["encoder:1:1"]
    assert (cal["n"], cal["test_n"], cal["steps"], cal["restarts"], cal["init"]) == (100, 100, 1, 1, "encoder")
    assert 0 <= cal["test_fpr"] <= 1 and cal["command"] and cal["images"].startswith("100 of test[1000:]")
    on_target = abs(cal["test_fpr"] - 0.05) <= TOLERANCE
    assert (reg.detector("mnist", "encoder", 1, 1) is not None) is on_target
    with pytest.raises(argparse.ArgumentTypeError):
        calibrate_detector.parse_grid("nowhere:1:1")
