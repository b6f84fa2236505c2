"""The projection engine and the detector (issue 3)."""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine
from service.purify import Detector, ProjectionConfig, check_images, freeze, project, roc_auc
from service.registry import Registry
from training import data


def slice_images(dataset: str, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = data.load_slice(dataset)
    return torch.from_numpy(data.to_float(xs[start : start + n])), torch.from_numpy(
        ys[start : start + n].astype("int64")
    )


def test_more_steps_lower_the_mse(registry: Registry) -> None:
    G = registry.generator("mnist")
    x, _ = slice_images("mnist", 0, 8)
    mses = [float(project(x, G, ProjectionConfig(steps=s, restarts=2), seed=1).mse.mean()) for s in (0, 5, 25, 100)]
    assert all(b < a for a, b in zip(mses, mses[1:], strict=False)), mses
    assert mses[-1] < 0.5 * mses[0]


def test_best_restart_is_chosen(tiny_registry: Registry) -> None:
    G = tiny_registry.generator("mnist")  # the choice among restarts, not the generator's quality
    x, _ = slice_images("mnist", 10, 4)
    p = project(x, G, ProjectionConfig(steps=10, restarts=5), seed=3)
    assert p.restart_mse.shape == (4, 5)
    assert torch.equal(p.mse, p.restart_mse.min(dim=1).values)
    with torch.no_grad():
        assert torch.allclose(G(p.z), p.images, atol=1e-6)
        assert torch.allclose((p.images - x).pow(2).mean(dim=(1, 2, 3)), p.mse, atol=1e-6)
    # more restarts, same first draws: the best can only improve
    p10 = project(x, G, ProjectionConfig(steps=10, restarts=10), seed=3)
    assert (p10.mse <= p.mse + 1e-7).all()


def test_encoder_warm_start_beats_random_init_at_equal_steps(registry: Registry) -> None:
    G, E = registry.generator("mnist"), registry.encoder("mnist")
    assert E is not None
    x, _ = slice_images("mnist", 20, 32)
    for steps in (0, 10):
        warm = project(x, G, ProjectionConfig(steps=steps, restarts=1, init="encoder"), encoder=E, seed=0)
        cold = project(x, G, ProjectionConfig(steps=steps, restarts=1), seed=0)
        assert warm.mse.mean() < cold.mse.mean(), (steps, warm.mse.mean(), cold.mse.mean())


def test_no_gradient_reaches_generator_weights(tiny_registry: Registry) -> None:
    G = tiny_registry.generator("mnist")
    x = torch.rand(2, 1, 28, 28)
    project(x, G, ProjectionConfig(steps=3, restarts=2))
    assert all(p.grad is None and not p.requires_grad for p in G.parameters())
    from service.nets import Generator

    with pytest.raises(ValueError, match="freeze"):
        project(x, Generator(), ProjectionConfig(steps=1, restarts=1))


def test_batch_equals_per_image_and_is_deterministic(tiny_registry: Registry) -> None:
    G = tiny_registry.generator("mnist")
    torch.manual_seed(0)
    x = torch.rand(5, 1, 28, 28)
    cfg = ProjectionConfig(steps=15, restarts=3)
    batch = project(x, G, cfg, seed=7)
    again = project(x, G, cfg, seed=7)
    assert torch.equal(batch.z, again.z)
    for i in range(len(x)):
        one = project(x[i : i + 1], G, cfg, seed=7)
        assert torch.allclose(one.z[0], batch.z[i], atol=1e-5)
        assert torch.allclose(one.mse[0], batch.mse[i], atol=1e-6)
    other = project(x, G, cfg, seed=8)
    assert not torch.equal(other.z, batch.z)


def test_adam_and_z_constraint_options(tiny_registry: Registry) -> None:
    G = tiny_registry.generator("mnist")
    x = torch.rand(2, 1, 28, 28)
    p = project(x, G, ProjectionConfig(steps=5, restarts=2, optimizer="adam", lr=0.05, z_max_norm=0.5))
    assert (p.z.norm(dim=1) <= 0.5 + 1e-5).all()


@pytest.mark.parametrize(
    "bad",
    [torch.rand(2, 28, 28), torch.rand(1, 3, 28, 28), torch.full((1, 1, 28, 28), float("nan")),
     torch.full((1, 1, 28, 28), 1.5), torch.zeros(1, 1, 28, 28, dtype=torch.int64), torch.rand(0, 1, 28, 28)],
)  # fmt: skip
def test_inputs_are_validated(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        check_images(bad)


def test_detector_false_positive_rate_near_target(registry: Registry) -> None:
    """Calibrate at 10% FPR on 300 clean images, measure on 300 other clean images (cheap warm-start settings)."""
    G, E = registry.generator("mnist"), registry.encoder("mnist")
    cfg = ProjectionConfig(steps=5, restarts=1, init="encoder")
    x_cal, _ = slice_images("mnist", 0, 300)
    x_val, _ = slice_images("mnist", 300, 300)
    det = Detector.calibrate(project(x_cal, G, cfg, encoder=E).mse, fpr=0.10)
    fpr = float(det.flag(project(x_val, G, cfg, encoder=E).mse).float().mean())
    assert 0.04 <= fpr <= 0.17, fpr  # binomial 99% band around 0.10 for n=300 is about ±0.045


def test_detector_separates_noise_from_digits(registry: Registry) -> None:
    G, E = registry.generator("mnist"), registry.encoder("mnist")
    cfg = ProjectionConfig(steps=5, restarts=1, init="encoder")
    x, _ = slice_images("mnist", 0, 64)
    noisy = (x + 0.3 * torch.randn_like(x).sign()).clamp(0, 1)
    clean_mse = project(x, G, cfg, encoder=E).mse
    noisy_mse = project(noisy, G, cfg, encoder=E).mse
    assert roc_auc(clean_mse, noisy_mse) > 0.95


def test_roc_auc_and_calibration_arithmetic() -> None:
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    det = Detector.calibrate(torch.arange(100, dtype=torch.float32), fpr=0.05)
    assert det.flag(torch.arange(100, dtype=torch.float32)).float().mean().item() == pytest.approx(0.05, abs=0.011)
    with pytest.raises(ValueError):
        Detector.calibrate(torch.ones(3), fpr=0.0)


def test_freeze_makes_eval_and_no_grad() -> None:
    from service.nets import Generator

    G = freeze(Generator().train())
    assert not G.training and not any(p.requires_grad for p in G.parameters())


def test_the_detector_applies_only_at_its_calibrated_projection(registry: Registry) -> None:
    cal = registry.detector_calibration("mnist", "random")
    if cal is None or "steps" not in cal:
        pytest.skip("no calibrated detector with its L, R recorded")
    assert registry.detector("mnist", "random", cal["steps"], cal["restarts"]) is not None
    assert registry.detector("mnist", "random", 3, 1) is None, "a threshold set at other L, R would misfire"
    assert "random start at L=3, R=1" in (registry.detector_note("mnist", "random", 3, 1) or "")
    engine = Engine(registry, "cpu")
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    off = engine.defend(x, "mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=3, restarts=1), seed=0)
    assert off.flagged is None and off.threshold is None and off.mse is not None
    assert off.detector_note is not None and "L=3, R=1" in off.detector_note
