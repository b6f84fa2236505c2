"""The audit follows its target's dataset: a colour upstream (3×32×32, 10 classes) audited end to end, at tiny size.

    a KServe ModelServer (tests/upstreams.py kserve --dataset shapes, the shipped shapes classifier A) serving
    `shapes-nhwc-u8` (UINT8 N×32×32×3 in [0, 255])  ←  `colour`, an allow-listed upstream of dataset "shapes"
    the audit in this process (`service.audit.host.in_process`), the shipped shapes test slice as its sample

Every request the upstream receives holds 32×32×3 images, the guarded pipeline purifies 3×32×32 shapes images
before them, the substitute is built for them, and the report has figures with their n; an ε beyond √(3·32·32) and
the MNIST slice are refused for this target.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
pytest.importorskip("torchattacks", reason="needs torchattacks (scripts/setup.sh --dev)")

from conftest import MODELS  # noqa: E402
from procs import Proc, free_port  # noqa: E402

from service.audit.data import load_sample  # noqa: E402
from service.audit.host import in_process  # noqa: E402
from service.audit.runner import Progress, new_doc, run_audit  # noqa: E402
from service.audit.spec import AuditError, AuditSpec, check_caps, check_threats  # noqa: E402
from service.audit.target import Host, Meter, target_spec  # noqa: E402
from service.config import Settings  # noqa: E402
from service.datasets import MNIST  # noqa: E402
from service.request import image_cap  # noqa: E402

N = 6
SPEC = {"target": "colour", "sample": "shapes", "n": N, "threats": [{"norm": "linf", "eps": [8 / 255]}],
        "attacks": ["square", "transfer"], "queries": 20, "seeds": 20, "rounds": 1, "repeats": 1,
        "pipelines": [{"defense": "defense-gan", "steps": 2, "restarts": 1}], "timing_images": 1}  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """The shapes upstream and the audit's in-process service, its proxy's requests and purifications recorded."""
    port = free_port()
    onnx = str(MODELS / "shapes" / "classifier_A.onnx")
    up = Proc([sys.executable, "tests/upstreams.py", "kserve", "--port", str(port), "--onnx", onnx, "--dataset",
               "shapes"], tmp_path_factory.mktemp("audit-colour") / "kserve.log", {"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        up.wait_http(f"http://127.0.0.1:{port}/v2/health/ready")
        colour = {"url": f"http://127.0.0.1:{port}", "model": "shapes-nhwc-u8", "layout": "NHWC", "datatype": "UINT8",
                  "value_range": 255.0, "dataset": "shapes", "timeout_s": 60}  # fmt: skip
        s = Settings(models_dir=MODELS, warm_up=False, torch_threads=1, default_steps=2, default_restarts=1,
                     proxy={"upstreams": {"colour": colour}})  # fmt: skip
        with in_process(s) as h:
            yield record(h)
    finally:
        up.stop()


def record(h: Host) -> Host:
    """`h` with every upstream request's image tensor (`h.sent`) and every purified batch (`h.purified`) noted."""
    sent: list[np.ndarray] = []
    purified: list[tuple[str, tuple[int, ...]]] = []
    infer, batcher = h.proxy.infer, h.models.get("colour").batcher  # type: ignore[union-attr]
    purify = batcher.purify

    async def infer_noted(name: str, req: Any, *a: Any, **kw: Any) -> Any:
        sent.append(req.inputs[0].data)
        return await infer(name, req, *a, **kw)

    async def purify_noted(x: Any, dataset: str, *a: Any, **kw: Any) -> Any:
        purified.append((dataset, tuple(x.shape)))
        return await purify(x, dataset, *a, **kw)

    h.proxy.infer, batcher.purify = infer_noted, purify_noted  # type: ignore[method-assign]
    h.sent, h.purified = sent, purified  # type: ignore[attr-defined]
    return h


def test_a_colour_target_is_audited_in_its_own_images(host: Host) -> None:
    spec = AuditSpec.model_validate(SPEC)
    check_caps(spec, host.settings)
    ds = target_spec("colour", host)
    assert ds.shape == (3, 32, 32) and ds.num_classes == 10
    sample = load_sample("shapes", host.settings, ds=ds)
    assert sample.x.shape[1:] == (3, 32, 32) and sample.classes == list(ds.classes)
    doc = new_doc(spec, sample, "now")
    run_audit(spec, sample, host, Meter(10_000), Progress(), doc)

    sent, purified = host.sent, host.purified  # type: ignore[attr-defined]
    assert sent and all(a.shape[1:] == (32, 32, 3) and a.dtype == np.uint8 for a in sent), "NHWC UINT8 32×32×3"
    guarded, rows = doc["variants"][1], doc["queries"]["rows"]
    assert purified and all(d == "shapes" and shape[1:] == (3, 32, 32) for d, shape in purified)
    assert max(shape[0] for _, shape in purified) == image_cap(host.settings, ds) < 64, "split to the cap for 3×32×32"
    assert sum(shape[0] for _, shape in purified) == sum(rows[guarded].values()), "every guarded row purified"
    assert doc["clean"]["bare"]["n"] == N and doc["clean"]["bare"]["accuracy"] >= 0.5, doc["clean"]
    assert {(r["variant"], r["attack"]) for r in doc["runs"]} == {(v, a) for v in doc["variants"]
                                                                 for a in ("square", "transfer")}  # fmt: skip
    assert all(r["summary"]["n"] == N and 0 <= r["summary"]["defended"] <= N for r in doc["runs"])
    assert rows["bare"]["attack"] > 0 and rows[guarded]["attack"] > 0 and doc["substitutes"][guarded]["rounds"] == 1
    assert all(w["n"] == N for w in doc["worst"]) and doc["gain"][0]["n"] == N


def l2(eps: float) -> AuditSpec:
    return AuditSpec.model_validate({"target": "colour", "threats": [{"norm": "l2", "eps": [eps]}]})


def test_an_eps_or_a_sample_of_another_shape_is_refused(host: Host) -> None:
    ds = target_spec("colour", host)
    check_threats(l2(55.0), ds)  # √(3·32·32) ≈ 55.4
    check_threats(l2(28.0), MNIST)
    for eps, images in ((55.5, ds), (28.5, MNIST)):
        with pytest.raises(AuditError, match="over √"):
            check_threats(l2(eps), images)
    with pytest.raises(AuditError, match=r"N×3×32×32 \(or N×32×32×3\)"):
        load_sample("mnist", host.settings, ds=ds)
