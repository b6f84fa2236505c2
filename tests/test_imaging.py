"""service.imaging: every accepted format decodes to the documented N×1×28×28 [0, 1] tensor; bad inputs raise."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from service import imaging
from service.imaging import ImageError

PIX = 4096 * 4096
MAXN = 64
RNG = np.random.default_rng(0)
DIGIT = RNG.integers(0, 256, size=(28, 28), dtype=np.uint8)


def png(a: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    if mode:
        im = im.convert(mode)
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def decode(data: bytes, **kw: object) -> torch.Tensor:
    return imaging.decode_files([data], kw.pop("max_pixels", PIX), kw.pop("max_images", MAXN), **kw)  # type: ignore[arg-type]


def test_gray_png_is_exact() -> None:
    x = decode(png(DIGIT))
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.from_numpy(DIGIT / 255.0).float(), atol=1e-6)


def test_webp_lossless_and_jpeg() -> None:
    ref = torch.from_numpy(DIGIT / 255.0).float()
    assert torch.allclose(decode(png(DIGIT, fmt="WEBP", lossless=True))[0, 0], ref, atol=1e-6)
    smooth = np.kron(DIGIT[:7, :7], np.ones((4, 4), dtype=np.uint8))  # blocky: JPEG keeps it roughly
    x = decode(png(smooth, fmt="JPEG", quality=95))[0, 0]
    assert (x - torch.from_numpy(smooth / 255.0).float()).abs().mean() < 0.05


def test_colour_is_luma_and_alpha_is_composited_over_black() -> None:
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    x = decode(png(rgb))[0, 0]
    assert torch.allclose(x, torch.full_like(x, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255), atol=1 / 255)
    rgba = np.full((28, 28, 4), 255, dtype=np.uint8)
    rgba[:, :14, 3] = 0  # left half transparent → black background
    y = decode(png(rgba))[0, 0]
    assert y[:, :14].max() == 0 and y[:, 14:].min() == 1


def test_non_square_is_padded_black_then_resized() -> None:
    wide = np.full((28, 56), 255, dtype=np.uint8)  # a white 28×56 band → centred band of half height
    x = decode(png(wide))[0, 0]
    assert x.shape == (28, 28)
    assert x[12:16].min() > 0.95 and x[:5].max() < 0.05 and x[-5:].max() < 0.05
    big = decode(png(np.full((112, 112), 255, dtype=np.uint8)))[0, 0]
    assert torch.allclose(big, torch.ones_like(big), atol=1e-3)


def test_sixteen_bit_png() -> None:
    a = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    x = decode(buf.getvalue())[0, 0]
    assert torch.allclose(x, torch.from_numpy(a / 65535.0).float(), atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "n"),
    [((28, 28), 1), ((3, 28, 28), 3), ((2, 1, 28, 28), 2), ((2, 28, 28, 1), 2), ((28, 28, 3), 1), ((40, 20), 1)],
)
def test_npy_shapes(shape: tuple[int, ...], n: int) -> None:
    a = RNG.random(shape).astype(np.float32)
    x = decode(npy(a))
    assert x.shape == (n, 1, 28, 28)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_npy_uint8_and_value_range() -> None:
    batch = np.stack([DIGIT, 255 - DIGIT])
    x = decode(npy(batch))
    assert torch.allclose(x[1, 0], torch.from_numpy((255 - DIGIT) / 255.0).float(), atol=1e-6)
    y = decode(npy(batch.astype(np.float32)), value_range=255.0)
    assert torch.allclose(x, y, atol=1e-6)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        decode(npy(batch.astype(np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1, 1.5])
def test_npy_values_checked(bad: float) -> None:
    a = np.full((28, 28), 0.5, dtype=np.float32)
    a[3, 4] = bad
    with pytest.raises(ImageError) as e:
        decode(npy(a))
    assert e.value.status == 400


def test_npy_pickle_truncated_and_huge_rejected() -> None:
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError) as e:
        decode(obj.getvalue())
    assert e.value.status == 415
    with pytest.raises(ImageError, match="truncated"):
        decode(npy(np.zeros((28, 28), np.float32))[:-100])
    header = io.BytesIO()  # a header that promises 10^10 floats, with no data behind it
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)})
    with pytest.raises(ImageError) as e:
        decode(header.getvalue())
    assert e.value.status == 413


def test_nested_arrays() -> None:
    x = imaging.decode_json(None, None, (DIGIT / 255.0).tolist(), PIX, MAXN)
    assert torch.allclose(x[0, 0], torch.from_numpy(DIGIT / 255.0).float(), atol=1e-6)
    x255 = imaging.decode_json(None, None, DIGIT.astype(float).tolist(), PIX, MAXN, 255.0)
    assert torch.allclose(x, x255, atol=1e-6)
    for bad in ([[0.1, 0.2], [0.3]], [["a", "b"]], {"x": 1}, 3, [[[[[0.5]]]]]):
        with pytest.raises(ImageError):
            imaging.decode_json(None, None, bad, PIX, MAXN)
    with pytest.raises(ImageError, match="exactly one"):
        imaging.decode_json("abc", None, [[0.0]], PIX, MAXN)


def test_base64_forms() -> None:
    data = png(DIGIT)
    ref = decode(data)
    for text in (base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode(),
                 base64.urlsafe_b64encode(data).decode().rstrip("=")):  # fmt: skip
        assert torch.equal(imaging.decode_json(text, None, None, PIX, MAXN), ref)
    two = imaging.decode_json(None, [base64.b64encode(data).decode()] * 2, None, PIX, MAXN)
    assert two.shape == (2, 1, 28, 28)
    for bad in ("!!!not base64!!!", "data:image/png,abc"):
        with pytest.raises(ImageError):
            imaging.decode_json(bad, None, None, PIX, MAXN)


def test_non_image_and_truncated_bytes() -> None:
    with pytest.raises(ImageError) as e:
        decode(b"hello, this is not an image")
    assert e.value.status == 415
    with pytest.raises(ImageError) as e:
        decode(b"")
    data = png(RNG.integers(0, 256, size=(64, 64), dtype=np.uint8))
    for cut in (30, len(data) // 2, len(data) - 20):
        with pytest.raises(ImageError) as e:
            decode(data[:cut])
        assert e.value.status == 400


def test_pixel_and_count_caps() -> None:
    bomb = png(np.zeros((2000, 2000), dtype=np.uint8))  # 4 Mpixel, a few kB
    assert len(bomb) < 50_000
    with pytest.raises(ImageError) as e:
        decode(bomb, max_pixels=1_000_000)
    assert e.value.status == 413
    with pytest.raises(ImageError) as e:
        decode(npy(np.zeros((5, 28, 28), np.float32)), max_images=4)
    assert e.value.status == 413


def test_pillow_decompression_bomb_limit_is_set() -> None:
    old = Image.MAX_IMAGE_PIXELS
    try:
        imaging.set_pixel_limit(1234)
        assert Image.MAX_IMAGE_PIXELS == 1234
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_png_encode_roundtrip() -> None:
    x = torch.from_numpy(DIGIT / 255.0).float()[None, None]
    data = imaging.encode_png(x[0])
    assert imaging.sniff(data) == "PNG"
    assert torch.allclose(decode(data), x, atol=1e-6)
    assert torch.allclose(decode(imaging.encode_npy(x)), x)
    with pytest.raises(ValueError):
        imaging.encode_png(torch.zeros(2, 1, 28, 28))
