"""The one request model (service.request): defaults, the manifest's per-dataset defaults, caps, strict types, and
the same request from v1's fields and from OIP parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_models

from service.config import Settings
from service.errors import ServiceError
from service.purify import ProjectionConfig
from service.registry import Registry
from service.request import (
    ClassifyFields,
    DetectFields,
    OIPFields,
    PurifyFields,
    Request,
    Target,
    check_count,
    oip_fields,
    resolve,
)

S = Settings(default_steps=7, default_restarts=3, encoder_steps=4, encoder_restarts=1, max_steps=20, max_restarts=4,
             max_batch_images=8)  # fmt: skip


@pytest.fixture(scope="module")
def with_defaults(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Tiny models whose manifest names a default pipeline for mnist: the enhanced twin, warm start."""
    root = write_tiny_models(tmp_path_factory.mktemp("defaults"), enhanced=True)
    doc = json.loads((root / "manifest.json").read_text())
    doc["defaults"] = {"mnist": {"classifier": "mnist/classifier_A_enhanced", "defense": "invert-classify"}}
    (root / "manifest.json").write_text(json.dumps(doc))
    return Registry(root)


def refused(fn: object, *args: object, **kw: object) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        fn(*args, **kw)  # type: ignore[operator]
    return e.value


def test_server_defaults_apply(tiny_registry: Registry) -> None:
    r = resolve(ClassifyFields.parse({}), S, tiny_registry)
    assert r == Request("mnist", "classifier_A", "defense-gan", ProjectionConfig().with_(steps=7, restarts=3), None)
    warm = resolve(PurifyFields.parse({"defense": "invert-classify"}), S, tiny_registry)
    assert (warm.classifier, warm.cfg) == (None, ProjectionConfig(init="encoder").with_(steps=4, restarts=1))
    assert resolve(ClassifyFields.parse({"defense": "none", "seed": 3}), S, tiny_registry).job_seed is None


def test_the_manifests_per_dataset_defaults_apply(with_defaults: Registry) -> None:
    r = resolve(ClassifyFields.parse({}), S, with_defaults)
    assert (r.classifier, r.defense) == ("classifier_A_enhanced", "invert-classify")
    assert r.cfg == ProjectionConfig(init="encoder").with_(steps=4, restarts=1)
    proxied = resolve(oip_fields({}), S, with_defaults, Target("mnist"))
    assert (proxied.classifier, proxied.defense) == (None, "invert-classify")
    override = resolve(ClassifyFields.parse({}), S.model_copy(update={"default_defense": "none"}), with_defaults)
    assert (override.defense, override.cfg) == ("none", None)


@pytest.mark.parametrize(
    ("raw", "words"),
    [({"steps": 21}, "max_steps"), ({"restarts": 5}, "max_restarts"), ({"restarts": 0}, "restarts=0 is outside"),
     ({"steps": 0}, "steps=0 is outside [1,"), ({"steps": -1}, "steps=-1 is outside")],
)  # fmt: skip
def test_caps_are_422(tiny_registry: Registry, raw: dict, words: str) -> None:
    e = refused(resolve, ClassifyFields.parse(raw), S, tiny_registry)
    assert e.status == 422 and words in str(e)
    assert e.status_for(oip=False) == 422 and e.status_for(oip=True) == 400


def test_images_cap_is_413() -> None:
    check_count(8, S)
    e = refused(check_count, 9, S)
    assert e.status == 413 and e.status_for(oip=True) == 413


@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "two", [2], None])
def test_integers_are_strict(value: object) -> None:
    if value is None:  # absent: the default
        assert ClassifyFields.parse({"steps": None}).steps is None
        return
    e = refused(ClassifyFields.parse, {"steps": value})
    assert e.status == 422 and "steps" in str(e)
    if isinstance(value, bool):
        assert "steps must be an integer, not a boolean" in str(e)
        assert "not a boolean" in str(refused(oip_fields, {"seed": value}))


def test_digit_strings_from_a_query_are_integers() -> None:
    f = ClassifyFields.parse({"steps": "3", "seed": " 4 "})
    assert (f.steps, f.seed) == (3, 4)
    assert "seed" in str(refused(ClassifyFields.parse, {"seed": 2**32}))


def test_unknown_and_misplaced_fields_are_refused() -> None:
    assert "colour" in str(refused(ClassifyFields.parse, {"colour": "blue"}))
    assert "format" in str(refused(ClassifyFields.parse, {"format": "png"}))  # a /v1/purify field
    assert "defense" in str(refused(DetectFields.parse, {"defense": "none"}))  # detect projects
    assert "not be empty" in str(refused(ClassifyFields.parse, {"model": " "}))


def test_models_not_shipped_are_404(tiny_registry: Registry) -> None:
    assert refused(resolve, ClassifyFields.parse({"model": "mnist/classifier_Z"}), S, tiny_registry).status == 404
    assert refused(resolve, PurifyFields.parse({"dataset": "cifar"}), S, tiny_registry).status == 404
    e = refused(resolve, ClassifyFields.parse({"defense": "enhanced-invert-classify"}), S, tiny_registry)
    assert e.status == 404 and "enhanced" in str(e)


def test_v1_fields_and_oip_parameters_resolve_to_the_same_request(tiny_registry: Registry) -> None:
    v1 = ClassifyFields.parse({"model": "mnist/classifier_A", "defense": "invert-classify", "steps": "3",
                               "restarts": 2, "seed": 7, "return_purified": True})  # fmt: skip
    params = {"defense": "invert-classify", "steps": 3, "restarts": 2, "seed": 7, "binary_data_output": True}
    oip = oip_fields(params)
    assert params == {"binary_data_output": True}, "our parameters are taken out, the rest stays for the upstream"
    assert isinstance(oip, OIPFields)
    a, b = resolve(v1, S, tiny_registry), resolve(oip, S, tiny_registry, Target("mnist", "classifier_A"))
    assert a == b == Request("mnist", "classifier_A", "invert-classify",
                             ProjectionConfig(init="encoder").with_(steps=3, restarts=2), 7)  # fmt: skip


def test_a_proxied_model_projects_or_forwards(tiny_registry: Registry) -> None:
    for defense in ("magnet", "enhanced-invert-classify", "magic"):
        e = refused(resolve, oip_fields({"defense": defense}), S, tiny_registry, Target("mnist"))
        assert e.status == 422 and "'defense' must be one of" in str(e)
    assert resolve(oip_fields({}), S, tiny_registry, Target("mnist")).defense == "defense-gan"
    assert resolve(oip_fields({"defense": "none"}), S, tiny_registry, Target("mnist")).cfg is None


def test_no_generator_no_projection(tmp_path: Path) -> None:
    root = write_tiny_models(tmp_path)
    doc = json.loads((root / "manifest.json").read_text())
    doc["artifacts"] = {k: v for k, v in doc["artifacts"].items() if k == "mnist/classifier_A"}
    (root / "manifest.json").write_text(json.dumps(doc))
    reg = Registry(root)
    assert refused(resolve, ClassifyFields.parse({"defense": "defense-gan"}), S, reg).status == 404
    assert resolve(ClassifyFields.parse({"defense": "defense-gan"}), S, reg, project=False).cfg is None
    assert resolve(ClassifyFields.parse({"defense": "none"}), S, reg).cfg is None
