"""Bytes and arrays at the edge → checked model input: float32 tensors N×C×H×W in [0, 1], C×H×W the dataset's
(`service.datasets.DatasetSpec`: 1×28×28 for MNIST and Fashion-MNIST, 3×32×32 for the colour shapes set).

Accepted: PNG, JPEG, WebP (recognised by their magic bytes, not by a file name or content type), NumPy `.npy`
(never pickled), base64 of any of those (data URLs too), and nested arrays (JSON).

Two steps: `read_files`/`read_json` decode to images as they came (H×W×1 gray or H×W×3 colour, any size), before
the request names its model; `to_tensor(images, n, spec)` fits them to the named model's dataset.

Input policy (documented in docs/service.md):
- Polarity is MNIST's for the gray sets: a light digit on a dark background. Nothing is inverted automatically; a
  dark-on-light image must be inverted by the caller (`255 − x`).
- Channels: colour is kept for a colour dataset (a gray image is replicated to R, G, B); for a gray dataset colour
  → grayscale with the ITU-R 601-2 luma weights (0.299 R + 0.587 G + 0.114 B). Transparency is composited over
  black (the background colour), so a transparent pixel is background.
- Size, by the dataset's `resize` policy, with a Lanczos (anti-aliased) filter: "fit" keeps the aspect ratio, fits
  the image into H×W and centres it on black (the same as padding it to a square first, without the square in
  memory); "fill" scales it to cover H×W and centre-crops. Inputs of the model's size are untouched. An 8-bit gray
  or RGB image more than 112 pixels wide or tall is first box-reduced by an integer factor in 8 bits (to no less
  than 112), so the float copy stays small.
- Values: 8-bit images are divided by 255, 16-bit by 65535; float arrays must already lie in [0, 1] (or in
  [0, 255] when the caller says `value_range=255`). NaN, infinity and out-of-range values are rejected, not clipped.
- Limits: every image's pixel count is checked from its header before decoding (Pillow's decompression-bomb limit
  is set to the same cap), and the number of images per request is capped. Memory per image is bounded by its
  pixel count (no intermediate larger than the decoded image), whatever its aspect ratio.
- Animated images: the first frame is used.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from service.datasets import MNIST, DatasetSpec
from service.errors import ServiceError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# an 8-bit image wider or taller than this is box-reduced before the float conversion, keeping ≥ 112 pixels on its
# long side: enough for the largest model side (64) too
REDUCE_ABOVE = 4 * 28
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a partly grey image


class ImageError(ServiceError, ValueError):
    """A bad input image: 400 malformed (the default), 413 too large, 415 unsupported."""

    status = 400


def set_pixel_limit(max_pixels: int) -> None:
    """Pillow's decompression-bomb limit (process-wide); `decode_image` also checks the cap itself."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def sniff(data: bytes) -> str | None:
    """The format from magic bytes: "PNG", "JPEG", "WEBP", "NPY", or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"\x93NUMPY"):
        return "NPY"
    return None


def small_png(data: bytes, max_pixels: int = 256 * 256) -> bool:
    """True for a PNG whose header declares at most `max_pixels` (cheap to decode in place: no thread hop)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return w * h <= max_pixels


# -- decoding ---------------------------------------------------------------------------------------
def _pil_to_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image → float32 H×W×1 (gray) or H×W×3 (colour) in [0, 1], alpha composited over black."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float32)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{mode} image values outside the 16-bit range")
        return (a / np.float32(65535.0))[..., None]
    if mode == "F":
        return _check_range(np.asarray(im, dtype=np.float32), 1.0)[..., None]
    if mode == "1":
        return (np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0))[..., None]
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in mode else "RGB")  # CMYK, YCbCr, LAB, HSV, La, RGBa, ...
    a = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return _composite(a[..., None] if a.ndim == 2 else a)


def _reduce_large(im: Image.Image) -> Image.Image:
    """Box-reduce a large 8-bit gray or RGB image by an integer factor k (to ≥ REDUCE_ABOVE on its long side) so the
    float copy and the resampling tables made next stay small. A side shorter than k goes to one pixel, where the
    fit to 28×28 puts it anyway. Other modes and small images are returned as they are."""
    w, h = im.size
    k = max(w, h) // REDUCE_ABOVE
    return im.reduce((min(k, w), min(k, h))) if k >= 2 and im.mode in ("L", "RGB") else im


def _composite(a: np.ndarray) -> np.ndarray:
    """H×W×C (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) in [0, 1] → H×W×1 or H×W×3, alpha over black."""
    c = a.shape[-1]
    if c not in (1, 2, 3, 4):
        raise ImageError(f"an image has {c} channels; expected 1, 2, 3 or 4")
    if c in (2, 4):
        return a[..., :-1] * a[..., -1:]
    return a


def _to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """H×W×1 or H×W×3 → H×W×`channels`: luma for colour to gray, replicated for gray to colour."""
    if a.shape[-1] == channels:
        return a
    return (a @ LUMA)[..., None] if channels == 1 else np.repeat(a, 3, axis=-1)


def _check_range(a: np.ndarray, top: float) -> np.ndarray:
    if not np.isfinite(a).all():
        raise ImageError("the image contains NaN or infinity")
    if a.size and (a.min() < 0 or a.max() > top):
        raise ImageError(f"image values must lie in [0, {top:g}], got [{a.min():.4g}, {a.max():.4g}]")
    return a


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes → float32 H×W×1 (gray) or H×W×3 (colour) in [0, 1]. Pixel count checked from the header
    first."""
    fmt = sniff(data)
    if fmt not in FORMATS:
        raise ImageError("not a PNG, JPEG or WebP image (unrecognised bytes)", status=415)
    if fmt == "PNG" and b"IEND\xaeB`\x82" not in data[-4096:]:
        raise ImageError("the PNG image is truncated (no IEND chunk)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageError("the image has no pixels")
            if w * h > max_pixels:
                raise ImageError(f"the image has {w}×{h} = {w * h} pixels; the limit is {max_pixels}", status=413)
            im.seek(0)
            im.load()
            return _pil_to_array(_reduce_large(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large: {exc}", status=413) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"the {fmt} image could not be decoded (truncated or corrupt header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the {fmt} image could not be decoded (truncated or corrupt): {exc}") from exc


def decode_npy(data: bytes, max_pixels: int, max_images: int) -> np.ndarray:
    """.npy bytes (no pickle) → a numeric array, size-checked before its data is read."""
    buf = io.BytesIO(data)
    try:
        version = npformat.read_magic(buf)
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, _, dtype = read_header(buf)  # the header only; the data is read after the size check
    except (ValueError, EOFError, SyntaxError) as exc:
        raise ImageError(f"not a valid .npy array: {exc}") from exc
    if dtype.kind not in "buif" or dtype.hasobject:
        raise ImageError(f"the .npy array has dtype {dtype}; expected a numeric one", status=415)
    count = math.prod(shape)
    if len(shape) > 4 or count > max_pixels * max_images:
        raise ImageError(f"the .npy array of shape {shape} is too large", status=413)
    if count * dtype.itemsize > len(data) - buf.tell():
        raise ImageError(f"the .npy array is truncated: its header promises shape {shape} of {dtype}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ImageError(f"the .npy array could not be read (truncated?): {exc}") from exc


def decode_base64(text: str) -> bytes:
    """Base64 text (standard or URL-safe alphabet, optional `data:...;base64,` prefix) → bytes."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageError("a data URL must be base64-encoded (data:<type>;base64,<data>)")
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"invalid base64: {exc}") from exc


# -- arrays → images --------------------------------------------------------------------------------
def array_images(a: np.ndarray, value_range: float = 1.0) -> list[np.ndarray]:
    """A numeric array → H×W×1 or H×W×3 images in [0, 1].

    Shapes: H×W; H×W×C (C ∈ {1, 2, 3, 4}, channels last); N×H×W; N×C×H×W or N×H×W×C (C ∈ {1, 3, 4}).
    uint8 arrays are scaled by 1/255 whatever `value_range` says; other integer and float arrays by 1/value_range,
    after checking that every value is finite and in [0, value_range].
    """
    if a.dtype.kind not in "buif":
        raise ImageError(f"expected a numeric array, got dtype {a.dtype}")
    if a.dtype == np.uint8:
        value_range = 255.0
    a = _check_range(np.asarray(a, dtype=np.float32), value_range) / np.float32(value_range)
    if a.ndim == 2:
        images = [a[..., None]]
    elif a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4) and a.shape[0] > 4:
        images = [_composite(a)]
    elif a.ndim == 3:
        images = [x[..., None] for x in a]
    elif a.ndim == 4 and a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        images = [_composite(np.moveaxis(x, 0, -1)) for x in a]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        images = [_composite(x) for x in a]
    else:
        raise ImageError(f"cannot read an image batch from an array of shape {a.shape}")
    if not images or any(x.size == 0 for x in images):
        raise ImageError("the array holds no pixels")
    return images


def nested_array(value: Any, value_range: float = 1.0) -> list[np.ndarray]:
    """A JSON nested list of numbers → images (see `array_images`); ragged or non-numeric lists are rejected."""
    if not isinstance(value, list):
        raise ImageError("`array` must be a nested list of numbers")
    try:
        a = np.array(value, dtype=np.float32)
    except OverflowError as exc:
        raise ImageError("`array` holds a number too large for an image value") from exc
    except (ValueError, TypeError) as exc:
        raise ImageError(f"`array` must be a rectangular nested list of numbers: {exc}") from exc
    return array_images(a, value_range)


# -- policy: H×W×C → the dataset's C×H×W ------------------------------------------------------------
def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos-resize H×W×C float32 to (height, width), one channel at a time (Pillow's float mode)."""
    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., k])).resize((w, h),
                                                                                       Image.Resampling.LANCZOS))
                     for k in range(a.shape[-1])], axis=-1)  # fmt: skip


def to_model_size(image: np.ndarray, spec: DatasetSpec = MNIST) -> np.ndarray:
    """One H×W×C image (or H×W gray) → float32 C×H×W of `spec`, by its channels and resize policy ("fit": fit and
    centre on black; "fill": cover and centre-crop); values clipped to [0, 1]. Memory: the output and one float32
    copy of the input, whatever the aspect ratio (no padded square)."""
    a = _to_channels(image[..., None] if image.ndim == 2 else image, spec.channels).astype(np.float32, copy=False)
    h, w = a.shape[:2]
    th, tw = spec.height, spec.width
    if (h, w) == (th, tw):
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    k = max(th / h, tw / w) if spec.resize == "fill" else min(th / h, tw / w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    r = _resize(a, (nh, nw))
    out = np.zeros((th, tw, a.shape[-1]), dtype=np.float32)
    top, left = (th - nh) // 2, (tw - nw) // 2  # negative for "fill": a crop
    src = r[max(0, -top) : max(0, -top) + min(th, nh), max(0, -left) : max(0, -left) + min(tw, nw)]
    out[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = src
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0).transpose(2, 0, 1))


def to_tensor(images: Sequence[np.ndarray], max_images: int, spec: DatasetSpec = MNIST) -> torch.Tensor:
    """Images of any size → float32 tensor N×C×H×W of `spec` in [0, 1] (count capped)."""
    if not images:
        raise ImageError("no image in the request")
    if len(images) > max_images:
        raise ImageError(f"{len(images)} images in one request; the limit is {max_images}", status=413)
    a = np.stack([to_model_size(g, spec) for g in images])
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:  # cannot happen after the checks; kept as a guard
        raise ImageError("image values must be finite and lie in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(a))


def load_bytes(data: bytes, max_pixels: int, max_images: int, value_range: float = 1.0) -> list[np.ndarray]:
    """Any accepted file's bytes (image or .npy) → H×W×C images."""
    if not data:
        raise ImageError("the upload is empty")
    if sniff(data) == "NPY":
        a = decode_npy(data, max_pixels, max_images)
        images = array_images(a, value_range)
        _check_pixels(images, max_pixels)
        return images
    return [decode_image(data, max_pixels)]


def _check_pixels(images: list[np.ndarray], max_pixels: int) -> None:
    for g in images:
        if g.shape[0] * g.shape[1] > max_pixels:
            raise ImageError(f"an image has {g.shape[0] * g.shape[1]} pixels; the limit is {max_pixels}", status=413)


def read_files(files: Sequence[bytes], max_pixels: int, max_images: int, value_range: float = 1.0) -> list[np.ndarray]:
    """Uploaded files → images as they came (H×W×C), count checked."""
    images: list[np.ndarray] = []
    for data in files:
        images.extend(load_bytes(data, max_pixels, max_images, value_range))
        if len(images) > max_images:
            raise ImageError(f"{len(images)}+ images in one request; the limit is {max_images}", status=413)
    if not images:
        raise ImageError("no image in the request")
    return images


def decode_files(files: Sequence[bytes], max_pixels: int, max_images: int, value_range: float = 1.0,
                 spec: DatasetSpec = MNIST) -> torch.Tensor:  # fmt: skip
    """Uploaded files → model input tensor for `spec`."""
    return to_tensor(read_files(files, max_pixels, max_images, value_range), max_images, spec)


def decode_json(image: str | None, images: Sequence[str] | None, array: Any, max_pixels: int, max_images: int,
                value_range: float = 1.0, spec: DatasetSpec = MNIST) -> torch.Tensor:  # fmt: skip
    """The JSON forms → model input tensor for `spec` (`read_json`, then `to_tensor`)."""
    return to_tensor(read_json(image, images, array, max_pixels, max_images, value_range), max_images, spec)


def read_json(image: str | None, images: Sequence[str] | None, array: Any, max_pixels: int, max_images: int,
              value_range: float = 1.0) -> list[np.ndarray]:  # fmt: skip
    """The JSON forms (`image` base64, `images` list of base64, `array` nested list) → images as they came."""
    given = [name for name, v in (("image", image), ("images", images), ("array", array)) if v is not None]
    if len(given) != 1:
        raise ImageError(
            "give exactly one of `image` (base64), `images` (list of base64) or `array` (nested list)", status=422
        )
    if array is not None:
        decoded = nested_array(array, value_range)
        _check_pixels(decoded, max_pixels)
        if len(decoded) > max_images:
            raise ImageError(f"{len(decoded)} images in one request; the limit is {max_images}", status=413)
        return decoded
    texts = [image] if image is not None else list(images or [])
    if len(texts) > max_images:
        raise ImageError(f"{len(texts)} images in one request; the limit is {max_images}", status=413)
    return read_files([decode_base64(t) for t in texts], max_pixels, max_images, value_range)


# -- encoding ---------------------------------------------------------------------------------------
def encode_png(x: torch.Tensor | np.ndarray) -> bytes:
    """One image (C×H×W with C 1 or 3, H×W, or 1×C×H×W) in [0, 1] → 8-bit gray or RGB PNG bytes."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a[0] if a.ndim == 4 and a.shape[0] == 1 else a
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    elif a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"encode_png takes one gray or RGB image, got shape {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(x: torch.Tensor | np.ndarray) -> str:
    return base64.b64encode(encode_png(x)).decode("ascii")


def encode_npy(x: torch.Tensor | np.ndarray) -> bytes:
    """Images as a float32 .npy (exact values, unlike 8-bit PNG)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32), allow_pickle=False)
    return buf.getvalue()
