"""An audit's labelled images: the shipped test slices, an `.npz` of images and labels, or an image folder (or a
`.zip` of one) with one subfolder per class. Never unpickled (`np.load(allow_pickle=False)`), sizes capped.

    sample = load_sample("mnist", settings, ds=spec)            # models/mnist/test_slice.npz
    sample = from_npz(data, settings, spec) / from_zip(data, settings, spec) / from_folder(path, settings, spec)
    x, y, seeds = sample.split(n, n_seeds)                      # attacked images, then the substitute's seeds

`spec` is the target's dataset (`service.datasets.DatasetSpec`, default MNIST's). Images come out as float32
N×C×H×W of it in [0, 1] (a folder's images of other sizes resized by `service.imaging`'s policy for it); labels as
int64 class indices below its class count (a folder's classes: its subfolders' names, integers when all are, else
sorted; a shipped slice's: the dataset's names).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import imaging
from service.audit.spec import SHIPPED, AuditError
from service.config import Settings
from service.datasets import MNIST, DatasetSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_FILES = 20_000  # images in a folder or zip
MAX_IMAGE_BYTES = 1024 * 1024


@dataclass
class Sample:
    """Labelled images and where they came from."""

    x: np.ndarray  # N×C×H×W float32 in [0, 1] (the target's dataset)
    y: np.ndarray  # N int64
    source: str
    classes: list[str]

    def split(self, n: int, seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first n images (attacked) and the last `seeds` after them (the substitute's held-out seeds)."""
        if n > len(self.x):
            raise AuditError(f"n = {n} but the sample ({self.source}) holds {len(self.x)} images")
        held = self.x[n:]
        return self.x[:n], self.y[:n], held[len(held) - min(seeds, len(held)) :]


def load_sample(name: str, s: Settings, data: bytes | None = None, fmt: str | None = None,
                ds: DatasetSpec = MNIST) -> Sample:  # fmt: skip
    """A shipped slice by name (its images must be `ds`'s: 422 otherwise), or the uploaded bytes (`fmt` npz or
    zip)."""
    if name in SHIPPED:
        path = s.models_dir / name / "test_slice.npz"
        if not path.exists():
            raise AuditError(f"the shipped {name} slice is missing ({path.name})", 404)
        with np.load(path, allow_pickle=False) as f:
            sample = _checked(f["x"], f["y"], s, f"{name} test slice", ds)
        sample.classes = list(ds.classes)
        return sample
    if name != "upload" or data is None:
        raise AuditError(f"sample must be one of {list(SHIPPED)} or 'upload' with a sample_file, got {name!r}")
    if len(data) > s.audit.max_sample_bytes:
        raise AuditError(f"the sample is {len(data)} bytes; the cap is {s.audit.max_sample_bytes} "
                         "(MG_AUDIT__MAX_SAMPLE_BYTES)", 413)  # fmt: skip
    return from_zip(data, s, ds) if fmt == "zip" else from_npz(data, s, ds)


def _digits(k: int) -> list[str]:
    return [str(i) for i in range(k)]


def from_npz(data: bytes, s: Settings, ds: DatasetSpec = MNIST) -> Sample:
    """An .npz with images (`x` or `images`: N×C×H×W or N×H×W×C of `ds`, or N×H×W for one channel; uint8 or floats
    in [0, 1]) and labels (`y` or `labels`: N class indices)."""
    if data[:4] != b"PK\x03\x04":
        raise AuditError("not an .npz (a zip archive of .npy arrays x and y); pickles are never loaded")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            keys = set(f.files)
            xk = next((k for k in ("x", "images") if k in keys), None)
            yk = next((k for k in ("y", "labels") if k in keys), None)
            if xk is None or yk is None:
                raise AuditError(f"the .npz needs arrays 'x' (or 'images') and 'y' (or 'labels'), has {sorted(keys)}")
            x, y = f[xk], f[yk]
    except AuditError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise AuditError(f"not a readable .npz (no pickles accepted): {exc}") from None
    return _checked(x, y, s, "uploaded .npz", ds)


def _forms(ds: DatasetSpec) -> str:
    """The image shapes `DatasetSpec.as_nchw` takes, e.g. "N×28×28 (or N×1×28×28, N×28×28×1)"."""
    c, h, w = ds.shape
    forms = [f"N×{h}×{w}"] * (c == 1) + [f"N×{c}×{h}×{w}", f"N×{h}×{w}×{c}"]
    return f"{forms[0]} (or {', '.join(forms[1:])})"


def _checked(x: np.ndarray, y: np.ndarray, s: Settings, source: str, ds: DatasetSpec) -> Sample:
    """Images of `ds` as float32 N×C×H×W in [0, 1] and their labels, checked (shape, count, range, classes)."""
    if x.dtype.kind not in "uif" or y.dtype.kind not in "ui" or y.ndim != 1:
        raise AuditError(f"{source}: images must be numeric and labels a 1-D integer array")
    nchw = ds.as_nchw(x)
    if nchw is None or len(x) != len(y) or len(x) == 0:
        raise AuditError(f"{source}: images must be {_forms(ds)} with N labels for the target's dataset {ds.name}, "
                         f"got {list(x.shape)} and {list(y.shape)}")  # fmt: skip
    if len(x) > s.audit.max_images + 1000:
        raise AuditError(f"{source}: {len(x)} images; the cap is {s.audit.max_images + 1000}")
    top = 255.0 if x.dtype == np.uint8 else 1.0
    xf = np.ascontiguousarray(nchw.astype(np.float32) / np.float32(top))
    if not np.isfinite(xf).all() or xf.min() < 0 or xf.max() > 1:
        raise AuditError(f"{source}: image values must lie in [0, 1] (floats) or [0, 255] (uint8)")
    _check_labels(y, ds, source)
    return Sample(xf, y.astype(np.int64), source, _digits(int(y.max()) + 1))


def _check_labels(y: np.ndarray, ds: DatasetSpec, source: str) -> None:
    """Labels are class indices of the target's dataset (the oracle and the substitute answer among its classes)."""
    if y.min() < 0 or y.max() >= ds.num_classes:
        raise AuditError(f"{source}: labels must be class indices in [0, {ds.num_classes}) of {ds.name}")


def from_zip(data: bytes, s: Settings, ds: DatasetSpec = MNIST) -> Sample:
    """A .zip of an image folder: `<class>/<image>` (optionally under one top folder)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and i.filename.lower().endswith(IMAGE_SUFFIXES)]
            _check_count(len(infos))
            files = []
            for i in infos:
                if i.file_size > MAX_IMAGE_BYTES:
                    raise AuditError(f"{i.filename}: {i.file_size} bytes, over {MAX_IMAGE_BYTES} per image")
                files.append((Path(i.filename).parts, z.read(i)))
    except zipfile.BadZipFile as exc:
        raise AuditError(f"not a readable .zip: {exc}") from None
    return _from_files(files, s, "uploaded .zip", ds)


def from_folder(root: Path, s: Settings, ds: DatasetSpec = MNIST) -> Sample:
    """An image folder with one subfolder per class."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    _check_count(len(paths))
    big = next((p for p in paths if p.stat().st_size > MAX_IMAGE_BYTES), None)
    if big is not None:
        raise AuditError(f"{big}: {big.stat().st_size} bytes, over {MAX_IMAGE_BYTES} per image")
    files = [(p.relative_to(root).parts, p.read_bytes()) for p in paths]
    return _from_files([(("root", *parts), b) for parts, b in files], s, str(root), ds)


def _check_count(n: int) -> None:
    if n == 0:
        raise AuditError("the folder holds no PNG, JPEG or WebP image")
    if n > MAX_FILES:
        raise AuditError(f"the folder holds {n} images; the cap is {MAX_FILES}")


def _from_files(files: list[tuple[tuple[str, ...], bytes]], s: Settings, source: str, ds: DatasetSpec) -> Sample:
    """Images labelled by their parent folder's name (one level of class folders, under at most one top folder),
    fitted to `ds`'s C×H×W."""
    parents = {parts[:-1] for parts, _ in files}
    depth = {len(p) for p in parents}
    if len(depth) != 1 or depth.pop() not in (1, 2):
        raise AuditError(f"{source}: expected one subfolder per class (class/image.png), got paths such as "
                         f"{'/'.join(files[0][0])}")  # fmt: skip
    names = sorted({parts[-2] for parts, _ in files})
    digits = all(c.isdigit() for c in names)
    classes = sorted(names, key=int) if digits else names
    index = {c: int(c) if digits else k for k, c in enumerate(classes)}
    xs, ys = [], []
    for parts, blob in files:
        try:
            image = imaging.decode_image(blob, s.max_image_pixels)
        except imaging.ImageError as exc:
            raise AuditError(f"{source}: {'/'.join(parts)}: {exc}") from None
        xs.append(imaging.to_model_size(image, ds))
        ys.append(index[parts[-2]])
    x, y = np.stack(xs).astype(np.float32), np.array(ys, np.int64)
    _check_labels(y, ds, source)
    order = np.random.default_rng(0).permutation(len(x))  # classes interleaved: the first n hold every class
    return Sample(x[order], y[order], source, [str(c) for c in classes])
