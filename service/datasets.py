"""What a dataset's images are: channels, height, width, class names, and how an image of another size is fitted.

Every network, the imaging policy, the engine, the proxy and the page follow a `DatasetSpec`; the manifest records
one per dataset (`datasets` in models/manifest.json) and `training.data` writes one beside each prepared data set.
A model tensor is always float32 N×C×H×W in [0, 1]; stored data sets are uint8 (N×H×W for one channel, N×H×W×C
otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Resize = Literal["fit", "fill"]
RESIZE_POLICIES: tuple[str, ...] = ("fit", "fill")
REFERENCE_PIXELS = 28 * 28  # the cost unit: one 28×28 gray image (MNIST's), to which the caps were set
SIDES = (28, 32, 64)  # the sizes the networks are built for (28: Defense-GAN's MNIST layout; 32, 64: DCGAN's)


class SpecError(ValueError):
    """A dataset spec that the networks cannot serve, or a malformed one."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's image format.

    `resize`: how an image of another size becomes H×W — "fit" keeps the aspect ratio and pads with black (digits
    and garments, drawn on a black background), "fill" scales to cover and centre-crops (photographs).
    """

    name: str
    channels: int = 1
    height: int = 28
    width: int = 28
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(str(i) for i in range(10)))
    resize: Resize = "fit"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise SpecError(f"dataset {self.name!r}: {self.channels} channels; 1 (gray) or 3 (RGB) are served")
        if self.height != self.width or self.height not in SIDES:
            raise SpecError(f"dataset {self.name!r}: {self.height}×{self.width} images; the networks take square "
                            f"images of side {', '.join(map(str, SIDES))}")  # fmt: skip
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise SpecError(f"dataset {self.name!r}: needs two or more distinct class names")
        if self.resize not in RESIZE_POLICIES:
            raise SpecError(f"dataset {self.name!r}: resize {self.resize!r} is not one of {RESIZE_POLICIES}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """C×H×W of one model input."""
        return (self.channels, self.height, self.width)

    def as_nchw(self, a: np.ndarray) -> np.ndarray | None:
        """`a` (N×C×H×W, N×H×W×C, or N×H×W for one channel) as N×C×H×W of this spec; None for any other shape."""
        c, h, w = self.shape
        if a.ndim == 3 and c == 1:
            a = a[:, None]
        elif a.ndim == 4 and tuple(a.shape[1:]) == (h, w, c) and tuple(a.shape[1:]) != self.shape:
            a = a.transpose(0, 3, 1, 2)
        return a if a.ndim == 4 and tuple(a.shape[1:]) == self.shape else None

    @property
    def side(self) -> int:
        return self.height

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def cost(self) -> float:
        """What one image costs relative to a 28×28 gray one (its value count): caps scale by it."""
        return self.channels * self.height * self.width / REFERENCE_PIXELS

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "height": self.height, "width": self.width, "classes": list(self.classes),
                "resize": self.resize}  # fmt: skip

    @classmethod
    def from_json(cls, name: str, doc: dict[str, Any]) -> DatasetSpec:
        try:
            return cls(name=name, channels=int(doc["channels"]), height=int(doc["height"]), width=int(doc["width"]),
                       classes=tuple(str(c) for c in doc["classes"]), resize=doc.get("resize", "fit"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"dataset {name!r}: malformed spec {doc!r}: {exc!r}") from exc


def gray28(name: str, classes: list[str] | tuple[str, ...] | None = None) -> DatasetSpec:
    """The MNIST-format spec (1×28×28, fitted on black): what a dataset without a recorded spec is."""
    return DatasetSpec(name, 1, 28, 28, tuple(classes) if classes else tuple(str(i) for i in range(10)))


MNIST = gray28("mnist")  # the default of the helpers that take a spec
