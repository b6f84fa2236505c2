"""training.data's imports: an ImageFolder-layout folder of real PNG/JPEG files, an .npz, and Shapes (small n);
the layout they write, their determinism, and each refusal with its message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import data


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 32), colour: bool = True,
            seed: int = 0) -> Path:  # fmt: skip
    """One subfolder per class of random images (w×h), PNG and JPEG alternately."""
    rng = np.random.default_rng(seed)
    w, h = size
    for cls, n in counts.items():
        for i in range(n):
            arr = rng.integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
            _save(root / cls / f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}", arr)
    return root


def _run(tmp: Path, *args: str) -> int:
    return data.main([*args, "--data-dir", str(tmp / "data"), "--models-dir", str(tmp / "models")])


def _refused(tmp: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert _run(tmp, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def test_image_folder_colour_resized_split_and_registered(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"dog": 10, "cat": 20, "bird": 5}, size=(40, 30))
    _save(src / "cat" / "extra.PNG", np.full((50, 20, 3), 200, np.uint8))  # upper-case suffix counts
    (src / "cat" / ".hidden.png").write_bytes(b"not an image")  # hidden files and other files are ignored
    (src / "dog" / "notes.txt").write_text("ignored")
    (src / ".git").mkdir()
    assert _run(tmp_path, "--image-folder", str(src), "--name", "pets", "--size", "32") == 0

    arrays = data.load("pets", tmp_path / "data")
    n_train, n_test = len(arrays["y_train"]), len(arrays["y_test"])
    assert arrays["x_train"].shape == (n_train, 32, 32, 3) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (n_test, 32, 32, 3) and arrays["y_test"].dtype == np.uint8
    # classes sorted by name; per class round(n·0.1) held out, at least one: bird 5 → 1, cat 21 → 2, dog 10 → 1
    assert np.bincount(arrays["y_test"]).tolist() == [1, 2, 1]
    assert np.bincount(arrays["y_train"]).tolist() == [4, 19, 9]

    doc = json.loads((tmp_path / "data" / "pets.json").read_text())
    assert doc["classes"] == ["bird", "cat", "dog"] and doc["channels"] == 3 and doc["height"] == doc["width"] == 32
    assert doc["resize"] == "fill" and doc["source"]["kind"] == "image-folder" and doc["source"]["images"] == 36
    sp = data.spec("pets", tmp_path / "data")  # the spec reads back; its "source" key is ignored
    assert sp.shape == (3, 32, 32) and sp.classes == ("bird", "cat", "dog")
    assert "pets" in data.registered(tmp_path / "data")
    assert data.to_float(arrays["x_test"]).shape == (n_test, 3, 32, 32)
    xs, ys = data.load_slice("pets", tmp_path / "models")
    assert np.array_equal(xs, arrays["x_test"]) and np.array_equal(ys, arrays["y_test"])


def test_gray_folder_native_size_is_deterministic(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a": 6, "b": 6}, size=(28, 28), colour=False)
    gray_rgb = np.repeat(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1), 3, axis=2)
    _save(src / "b" / "rgb_but_gray.png", gray_rgb)  # an RGB file of gray content keeps the set gray
    runs = [tmp_path / "one", tmp_path / "two"]
    for out in runs:
        assert _run(out, "--image-folder", str(src), "--name", "digits") == 0
    arrays = data.load("digits", runs[0] / "data")
    assert arrays["x_train"].shape == (11, 28, 28) and arrays["x_test"].shape == (2, 28, 28)
    assert data.spec("digits", runs[0] / "data").channels == 1
    for rel in ("data/digits.npz", "data/digits.json", "models/digits/test_slice.npz"):
        assert (runs[0] / rel).read_bytes() == (runs[1] / rel).read_bytes(), rel
    # another seed, another split; --channels 3 stores N×H×W×3
    assert _run(tmp_path / "s1", "--image-folder", str(src), "--name", "digits", "--seed", "1", "--channels", "3") == 0
    other = data.load("digits", tmp_path / "s1" / "data")
    assert other["x_train"].shape == (11, 28, 28, 3)
    assert not np.array_equal(other["x_train"][..., 0], arrays["x_train"])


def test_resize_policies() -> None:
    wide = Image.fromarray(np.full((32, 64), 255, np.uint8))
    fit = np.asarray(data.fit_image(wide, 32, "fit"))
    assert fit.shape == (32, 32) and fit[:8].max() == 0 and fit[24:].max() == 0 and fit[12:20].min() == 255
    assert np.asarray(data.fit_image(wide, 32, "fill")).min() == 255


def test_transparency_is_composited_over_black(tmp_path: Path) -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:14, :, 3] = 255  # top half opaque, bottom half transparent
    path = _save(tmp_path / "t.png", rgba)
    with data.open_image(path) as im:
        out = np.asarray(data.decode(im, path, "RGB"))
    assert out[:14].min() == 200 and out[14:].max() == 0


def _truncated(root: Path) -> Path:
    png = _save(root / "a" / "bad.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return png


@pytest.mark.parametrize(
    ("case", "args", "expect"),
    [
        ("empty", [], "is empty"),
        ("loose", [], "holds images directly"),
        ("no_images", [], "no class subfolder holding images"),
        ("one_class", [], "only one class"),
        ("truncated", [], "bad.png: unreadable or truncated"),
        ("garbage", [], "junk.png: not a readable"),
        ("mixed", [], "images of mixed sizes"),
        ("odd_size", [], "30×30; the networks take square images of side 28, 32 or 64: pass --size"),
        ("too_few", [], "class 'b' has 1 image(s)"),
        ("ok", ["--size", "100"], "--size 100: the networks take square images"),
        ("ok", ["--name", "mnist"], "'mnist' is a built-in data set"),
        ("ok", ["--name", "shapes"], "'shapes' is a built-in data set"),
        ("ok", ["--name", "Bad Name"], "--name 'Bad Name': use 1-32 of"),
        ("ok", ["--name", "x" * 33], "use 1-32 of"),
        ("ok", ["--test-fraction", "1.5"], "--test-fraction 1.5"),
        ("ok", ["--idx-dir", "/nowhere"], "--idx-dir applies to --dataset"),
    ],
)
def test_image_folder_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, args: list[str],
                               expect: str) -> None:  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    if case == "loose":
        _save(src / "x.png", np.zeros((28, 28), np.uint8))
    elif case == "no_images":
        (src / "a").mkdir()
        (src / "a" / "readme.txt").write_text("no images")
    elif case == "one_class":
        _folder(src, {"a": 3})
    elif case == "truncated":
        _folder(src, {"a": 2, "b": 2})
        _truncated(src)
    elif case == "garbage":
        _folder(src, {"a": 2, "b": 2})
        (src / "b" / "junk.png").write_bytes(b"GIF89a but not really")
    elif case == "mixed":
        _folder(src, {"a": 2, "b": 2}, size=(28, 28))
        _save(src / "b" / "z_big.png", np.zeros((32, 32), np.uint8))
    elif case == "odd_size":
        _folder(src, {"a": 2, "b": 2}, size=(30, 30))
    elif case == "too_few":
        _folder(src, {"a": 3, "b": 1})
    elif case == "ok":
        _folder(src, {"a": 2, "b": 2})
    argv = ["--image-folder", str(src), "--name", "set", *args]
    if "--name" in args:
        argv = ["--image-folder", str(src), *args]
    err = _refused(tmp_path, capsys, *argv)
    assert expect in err, err
    if case == "mixed":  # both files and their sizes are named
        assert "000.png is 28×28" in err and "z_big.png is 32×32" in err, err


def test_caps_on_images_and_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    src = _folder(tmp_path / "src", {"a": 2, "b": 2})
    monkeypatch.setattr(data, "MAX_IMAGES", 3)
    assert "4 images; the limit is 3" in _refused(tmp_path, capsys, "--image-folder", str(src), "--name", "s")
    monkeypatch.setattr(data, "MAX_IMAGES", 10)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    err = _refused(tmp_path, capsys, "--image-folder", str(src), "--name", "s")
    assert "000.png: 32×32 is 1024 pixels; the limit is 1000" in err, err


def test_missing_name_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "need --name" in _refused(tmp_path, capsys, "--image-folder", str(tmp_path))
    assert "not a folder" in _refused(tmp_path, capsys, "--image-folder", str(tmp_path / "nope"), "--name", "s")


def test_npz_xy_float_nchw_with_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 28, 28)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "src.npz", x=x, y=y, classes=np.array(["w", "x", "y", "z"]))
    assert _run(tmp_path, "--npz", str(tmp_path / "src.npz"), "--name", "letters") == 0
    arrays = data.load("letters", tmp_path / "data")
    assert arrays["x_train"].shape == (36, 28, 28) and arrays["x_test"].shape == (4, 28, 28)
    assert arrays["x_train"].dtype == np.uint8 and np.bincount(arrays["y_test"]).tolist() == [1, 1, 1, 1]
    # the stored images are the rounded source images
    assert np.isin(arrays["x_test"][0], np.rint(x * 255).astype(np.uint8)[:, 0]).all()
    assert data.spec("letters", tmp_path / "data").classes == ("w", "x", "y", "z")


def test_npz_presplit_nchw_colour_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), "y_train": np.arange(12) % 3,
              "x_test": rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), "y_test": np.arange(6) % 3}  # fmt: skip
    np.savez(tmp_path / "split.npz", **arrays)
    assert _run(tmp_path, "--npz", str(tmp_path / "split.npz"), "--name", "tri") == 0
    got = data.load("tri", tmp_path / "data")
    assert np.array_equal(got["x_train"], arrays["x_train"].transpose(0, 2, 3, 1))
    assert np.array_equal(got["y_test"], arrays["y_test"]) and got["y_test"].dtype == np.uint8
    assert data.spec("tri", tmp_path / "data").classes == ("0", "1", "2")
    assert _run(tmp_path, "--npz", str(tmp_path / "split.npz"), "--name", "tri64", "--size", "64") == 0
    assert data.load("tri64", tmp_path / "data")["x_test"].shape == (6, 64, 64, 3)


def test_npz_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "obj.npz", x=np.full((2, 28, 28), None, dtype=object), y=np.zeros(2))  # would need pickle
    err = _refused(tmp_path, capsys, "--npz", str(tmp_path / "obj.npz"), "--name", "o")
    assert "obj.npz: not a readable .npz" in err, err
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 28, 28), np.uint8))
    assert "expected x, y or x_train" in _refused(tmp_path, capsys, "--npz", str(tmp_path / "keys.npz"), "--name", "k")
    np.savez(tmp_path / "odd.npz", x=np.zeros((4, 20, 20), np.uint8), y=np.array([0, 1, 0, 1]))
    assert "pass --size" in _refused(tmp_path, capsys, "--npz", str(tmp_path / "odd.npz"), "--name", "k")
    np.savez(tmp_path / "hot.npz", x=np.full((4, 28, 28), 2.0), y=np.array([0, 1, 0, 1]))
    assert "must lie in [0, 1]" in _refused(tmp_path, capsys, "--npz", str(tmp_path / "hot.npz"), "--name", "k")
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 0, 0, 1]))
    assert "class '1' has 1 image(s)" in _refused(tmp_path, capsys, "--npz", str(tmp_path / "one.npz"), "--name", "k")


def test_shapes_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("training.shapes")
    monkeypatch.setattr(data, "SHAPES_TRAIN", 30)
    monkeypatch.setattr(data, "SHAPES_TEST", 20)
    assert _run(tmp_path, "--dataset", "shapes") == 0
    arrays = data.load("shapes", tmp_path / "data")
    assert arrays["x_train"].shape == (30, 32, 32, 3) and arrays["x_test"].shape == (20, 32, 32, 3)
    sp = data.spec("shapes")
    assert sp.shape == (3, 32, 32) and sp.resize == "fill" and sp.num_classes == 10
    assert data.spec("shapes", tmp_path / "data") == sp
    assert json.loads((tmp_path / "data" / "shapes.json").read_text())["classes"] == list(sp.classes)
    assert "shapes" in data.DATASETS and "shapes" in data.registered(tmp_path / "data")


def test_shapes_spec_without_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training

    monkeypatch.setitem(sys.modules, "training.shapes", None)  # `from training import shapes` now fails
    monkeypatch.delattr(training, "shapes", raising=False)
    with pytest.raises(data.DataError, match="shapes.json is missing"):
        data.spec("shapes", tmp_path)
    (tmp_path / "shapes.json").write_text(json.dumps(data.DatasetSpec("shapes", 3, 32, 32, ("a", "b")).to_json()))
    assert data.spec("shapes", tmp_path).classes == ("a", "b")
