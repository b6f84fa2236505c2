"""The audit's reading of a target's metadata: the input's shape against the dataset (units, no server).

An upstream whose metadata declares another image size or channel count than the proxy can send for its dataset is
refused before any query; an RGB upstream in front of a gray dataset is accepted, and the audit then sends it three
channels, as the proxy does.
"""

from __future__ import annotations

import pytest

from service.audit.spec import AuditError
from service.audit.target import TargetInfo, _check_contract
from service.config import Upstream
from service.datasets import MNIST, DatasetSpec

SHAPES = DatasetSpec("shapes", 3, 32, 32, tuple("abcdefghij"), "fill")


def info(shape: list[int], spec: DatasetSpec, layout: str = "NCHW") -> TargetInfo:
    up = Upstream(url="http://127.0.0.1:1", layout=layout, dataset=spec.name)
    meta = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape}]}
    return TargetInfo("t", "proxied", up, spec.name, meta, None, [], spec)


@pytest.mark.parametrize(("shape", "spec", "layout", "channels"), [
    ([-1, 1, 28, 28], MNIST, "NCHW", 1),
    ([-1, 3, 28, 28], MNIST, "NCHW", 3),  # RGB before a gray dataset: the proxy replicates the purified image
    ([-1, 28, 28, 3], MNIST, "NHWC", 3),
    ([-1, 3, 32, 32], SHAPES, "NCHW", 3),
    ([-1, 32, 32, 3], SHAPES, "NHWC", 3),
    ([-1, 3, -1, -1], SHAPES, "NCHW", 3),  # dynamic sizes match any
])  # fmt: skip
def test_matching_shapes_pass_and_set_the_channels(shape: list[int], spec: DatasetSpec, layout: str,
                                                   channels: int) -> None:  # fmt: skip
    t = info(shape, spec, layout)
    _check_contract(t, None)
    assert t.channels == channels


@pytest.mark.parametrize(("shape", "spec", "words"), [
    ([-1, 1, 32, 32], SHAPES, "[3, 32, 32]"),  # a gray model behind a colour dataset
    ([-1, 3, 64, 64], SHAPES, "[3, 32, 32]"),
    ([-1, 1, 32, 32], MNIST, "[1, 28, 28] or [3, 28, 28]"),
    ([-1, 784], MNIST, "[784]"),
])  # fmt: skip
def test_other_shapes_are_refused_with_what_the_dataset_needs(shape: list[int], spec: DatasetSpec,
                                                              words: str) -> None:  # fmt: skip
    with pytest.raises(AuditError, match="shape") as e:
        _check_contract(info(shape, spec), None)
    assert words in str(e.value) and e.value.status == 422
