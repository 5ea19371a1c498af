"""Data sets: every format from fixtures built here, the options, the convert round trip, every bad input."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffdistill.cli.main import main as cli_main
from diffdistill.data import edm_zip_name, open_dataset
from diffdistill.data.formats import safe_unpickle
from diffdistill.errors import DiffdistillError

SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def rng_images(n, h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def save_image(path: Path, array: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path, format=fmt, **kw)
    return path


def encode(array: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format=fmt)
    return buf.getvalue()


def expected(array: np.ndarray) -> torch.Tensor:
    """The oracle: HWC uint8 -> CHW float in [-1, 1] as x / 127.5 - 1."""
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)


# --------------------------------------------------------------------------------------------------
# Folders and zips


def test_folder_png_jpeg_recursive(tmp_path):
    imgs = rng_images(3, 8, 8)
    save_image(tmp_path / "b" / "c" / "one.png", imgs[1])
    save_image(tmp_path / "a.png", imgs[0])
    flat = np.full((8, 8, 3), (200, 40, 90), dtype=np.uint8)  # a flat colour survives JPEG almost exactly
    save_image(tmp_path / "b" / "two.JPG", flat, fmt="jpeg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    save_image(tmp_path / ".hidden" / "x.png", imgs[2])

    ds = open_dataset(tmp_path)
    assert len(ds) == 3 and ds.shape == (3, 8, 8) and ds.resolution == 8 and ds.label_dim == 0
    assert ds.name == tmp_path.name
    x0, y0 = ds[0]                     # sorted by relative path: a.png, b/c/one.png, b/two.JPG
    assert x0.dtype == torch.float32 and y0 == -1
    torch.testing.assert_close(x0, expected(imgs[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ds[1][0], expected(imgs[1]), rtol=0, atol=1e-6)
    assert (ds[2][0] - expected(flat)).abs().max() < 0.05
    assert ds.item_name(1).endswith("one.png")
    assert all(float(ds[i][0].min()) >= -1 and float(ds[i][0].max()) <= 1 for i in range(3))


def test_folder_grey_and_dataset_json(tmp_path):
    grey = rng_images(2, 5, 5, c=1)
    save_image(tmp_path / "x" / "0.png", grey[0])
    save_image(tmp_path / "x" / "1.png", grey[1])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["x/1.png", 7], ["x/0.png", 2]]}))
    ds = open_dataset(tmp_path)
    assert ds.shape == (1, 5, 5) and ds.label_dim == 8
    assert [ds[i][1] for i in range(2)] == [2, 7]
    torch.testing.assert_close(ds[1][0], expected(grey[1]), rtol=0, atol=1e-6)


def make_edm_zip(path: Path, images: np.ndarray, labels: list[int] | None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images):
            zf.writestr(edm_zip_name(i), encode(img))
        zf.writestr("dataset.json", json.dumps({"labels": None if labels is None else
                                                [[edm_zip_name(i), y] for i, y in enumerate(labels)]}))
    return path


def test_zip_with_labels(tmp_path):
    imgs = rng_images(4, 6, 6, seed=1)
    path = make_edm_zip(tmp_path / "data.zip", imgs, [3, 1, 0, 1])
    assert edm_zip_name(1234) == "00001/img00001234.png"
    ds = open_dataset(path)
    assert len(ds) == 4 and ds.shape == (3, 6, 6) and ds.label_dim == 4 and ds.name == "data"
    assert [ds[i][1] for i in range(4)] == [3, 1, 0, 1]
    for i in range(4):
        torch.testing.assert_close(ds[i][0], expected(imgs[i]), rtol=0, atol=1e-6)
    off = open_dataset(path, use_labels=False)
    assert off.label_dim == 0 and off[0][1] == -1
    assert open_dataset(path, use_labels="require").label_dim == 4
    # Works inside DataLoader workers (the zip handle is re-opened per process) and batches.
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)))
    assert batch.shape == (4, 3, 6, 6) and labels.tolist() == [3, 1, 0, 1]


def test_zip_without_labels_and_require(tmp_path):
    path = make_edm_zip(tmp_path / "u.zip", rng_images(2, 4, 4), None)
    ds = open_dataset(path)
    assert ds.label_dim == 0 and ds[1][1] == -1
    with pytest.raises(DiffdistillError, match="u.zip: labels are required"):
        open_dataset(path, use_labels="require")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python tarball (tiny, same layout)


def cifar_batch(images_chw: np.ndarray, labels: list[int], bytes_keys: bool) -> dict:
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    return {key("batch_label"): key("tiny batch"), key("labels"): labels,
            key("data"): images_chw.reshape(len(images_chw), -1),
            key("filenames"): [key("f.png")] * len(labels)}


def make_cifar(tmp_path: Path, protocol: int = 2, bytes_keys: bool = True):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(12, 3, 32, 32), dtype=np.uint8)  # 5 train batches of 2, test of 2
    labels = rng.integers(0, 10, size=12).tolist()
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        names = ["test_batch"] + [f"data_batch_{k}" for k in (3, 1, 2, 5, 4)]  # any member order
        for name in names:
            k = 5 if name == "test_batch" else int(name[-1]) - 1
            blob = pickle.dumps(cifar_batch(images[2 * k:2 * k + 2], labels[2 * k:2 * k + 2], bytes_keys),
                                protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, images, labels


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (5, False)])
def test_cifar_tarball(tmp_path, protocol, bytes_keys):
    path, images, labels = make_cifar(tmp_path, protocol, bytes_keys)
    train = open_dataset(path)
    assert len(train) == 10 and train.shape == (3, 32, 32) and train.label_dim == 10
    assert train.name == "cifar10-train"
    for i in (0, 3, 9):
        x, y = train[i]
        torch.testing.assert_close(x, expected(images[i].transpose(1, 2, 0)), rtol=0, atol=1e-6)
        assert y == labels[i]
    test = open_dataset(f"{path}?split=test")
    assert len(test) == 2 and [test[i][1] for i in range(2)] == labels[10:]
    assert len(open_dataset(path, split="test")) == 2
    # The extracted folder (as torchvision leaves it) reads the same.
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    folder = open_dataset(tmp_path / "x" / "cifar-10-batches-py")
    assert len(folder) == 10 and torch.equal(folder[7][0], train[7][0]) and folder[7][1] == labels[7]


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    blob = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
    with pytest.raises(DiffdistillError, match=r"batch\.pkl: not a readable CIFAR batch.*not allowed"):
        safe_unpickle(io.BytesIO(blob), "batch.pkl")
    assert not marker.exists()
    # The same inside a tarball: the error names the tarball member.
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DiffdistillError, match="test_batch: not a readable CIFAR batch"):
        open_dataset(path, split="test")
    assert not marker.exists()


def test_cifar_missing_batches(tmp_path):
    path, _, _ = make_cifar(tmp_path)
    with tarfile.open(path) as tar, tarfile.open(tmp_path / "part.tar.gz", "w:gz") as out:
        for m in tar.getmembers():
            if not m.name.endswith("data_batch_4"):
                out.addfile(m, tar.extractfile(m))
    pattern = r"part\.tar\.gz: not a CIFAR-10 python tarball \(no data_batch_4"
    with pytest.raises(DiffdistillError, match=pattern):
        open_dataset(tmp_path / "part.tar.gz")


# --------------------------------------------------------------------------------------------------
# npz


@pytest.mark.parametrize("layout", ["hwc", "chw", "grey"])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_layouts(tmp_path, layout, compressed):
    hwc = rng_images(5, 6, 7, c=1 if layout == "grey" else 3, seed=4)
    x = {"hwc": hwc, "chw": hwc.transpose(0, 3, 1, 2), "grey": hwc[..., 0]}[layout]
    y = np.arange(5) % 3
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    ds = open_dataset(path)
    assert ds.shape == (hwc.shape[3], 6, 7) and ds.resolution is None and ds.label_dim == 3
    assert isinstance(ds.source.x, np.memmap) != compressed  # uncompressed members are memory-mapped
    for i in range(5):
        torch.testing.assert_close(ds[i][0], expected(hwc[i]), rtol=0, atol=1e-6)
        assert ds[i][1] == y[i]
    # A memory-mapped source survives pickling (DataLoader workers) without copying the array.
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[4][0], ds[4][0])


def test_npz_float_and_splits(tmp_path):
    hwc = rng_images(3, 4, 4, seed=5)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=hwc.astype(np.float32) / 255, y_train=np.array([1, 2, 3]),
             x_test=hwc[:2].astype(np.float32) / 127.5 - 1)
    train = open_dataset(path)
    assert len(train) == 3 and train[2][1] == 3 and train.label_dim == 4
    torch.testing.assert_close(train[1][0], expected(hwc[1]), rtol=0, atol=1e-5)  # [0, 1] -> [-1, 1]
    test = open_dataset(f"{path}?split=test")
    assert len(test) == 2 and test.label_dim == 0 and test.name == "f-test"
    torch.testing.assert_close(test[1][0], expected(hwc[1]), rtol=0, atol=1e-5)   # [-1, 1] as is
    # (N, D) arrays are points.
    np.savez(tmp_path / "p.npz", x=np.array([[0.5, -2.0], [3.0, 1.0]], dtype=np.float64))
    pts = open_dataset(tmp_path / "p.npz")
    assert pts.shape == (2,) and pts[1][0].tolist() == [3.0, 1.0]


# --------------------------------------------------------------------------------------------------
# LMDB


def test_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    imgs = rng_images(3, 5, 5, seed=6)
    env = lmdb.open(str(tmp_path / "church_outdoor_train_lmdb"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, img in enumerate(imgs):
            txn.put(f"{i:040x}".encode(), encode(img, "webp" if i == 1 else "png"))
    env.close()
    ds = open_dataset(tmp_path / "church_outdoor_train_lmdb")
    assert len(ds) == 3 and ds.shape == (3, 5, 5) and ds.label_dim == 0
    assert ds.name == "church_outdoor_train_lmdb"
    torch.testing.assert_close(ds[0][0], expected(imgs[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ds[2][0], expected(imgs[2]), rtol=0, atol=1e-6)
    assert ds[1][0].shape == (3, 5, 5)  # lossy webp
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[2][0], ds[2][0])


def test_lmdb_missing_package(tmp_path, monkeypatch):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)  # import lmdb -> ImportError
    with pytest.raises(DiffdistillError, match=r"db: .*pip install lmdb"):
        open_dataset(tmp_path / "db")


# --------------------------------------------------------------------------------------------------
# Embedded and analytic


def test_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = open_dataset("digits")
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.label_dim == 10
    for i in (0, 1000, 1796):
        x, y = ds[i]
        assert y == ref.target[i]
        torch.testing.assert_close(x[0], torch.from_numpy(ref.images[i] / 8 - 1).float())
    values = torch.stack([ds[i][0] for i in range(50)])
    assert float(values.min()) == -1 and float(values.max()) == 1  # grey levels 0 and 16


def test_toy_ring8_and_gmm(tmp_path):
    ds = open_dataset("toy:ring8")
    assert len(ds) == 100_000 and ds.shape == (2,) and ds.label_dim == 0 and ds[0][1] == -1
    torch.testing.assert_close(ds[17][0], open_dataset("toy:ring8")[17][0])  # a function of the index only
    assert not torch.equal(ds[17][0], ds[18][0])
    assert not torch.equal(ds[17][0], open_dataset("toy:ring8?seed=1")[17][0])
    pts = torch.stack([ds[i][0] for i in range(2000)]).double()
    # Oracle (algorithms.md §7): E|x|^2 = |mu|^2 + D s^2 = 1 + 2 * 0.01; the mean is 0.
    assert abs(float((pts**2).sum(1).mean()) - 1.02) < 0.02
    assert float(pts.mean(0).abs().max()) < 0.05
    assert len(open_dataset("toy:ring8?size=10")) == 10

    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({"means": [[1.0, -2.0, 0.5]], "stds": [0.2], "weights": [1.0]}))
    g = open_dataset(f"gmm:{spec}")
    pts = torch.stack([g[i][0] for i in range(1000)]).double()
    assert g.shape == (3,)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(pts.mean(0), mean, atol=0.03, rtol=0)
    assert abs(float(pts.std(0).mean()) - 0.2) < 0.02
    with pytest.raises(DiffdistillError, match="resolution and xflip apply to images"):
        open_dataset("toy:ring8", xflip=True)


# --------------------------------------------------------------------------------------------------
# Options: resolution, flip, max_size


def test_resolution_center_crop(tmp_path):
    img = np.zeros((4, 6, 3), dtype=np.uint8)          # 6 wide, 4 high: the centre square is columns 1..4
    img[:, 0] = 255
    img[:, 5] = 255
    img[:, 1:5] = np.arange(4, dtype=np.uint8)[:, None, None] * 40 + 10
    save_image(tmp_path / "f" / "wide.png", img)
    save_image(tmp_path / "f" / "tall.png", np.full((10, 3, 3), 77, dtype=np.uint8))
    ds = open_dataset(tmp_path / "f", resolution=4)
    assert ds.shape == (3, 4, 4) and ds.resolution == 4
    torch.testing.assert_close(ds[1][0], expected(img[:, 1:5]), rtol=0, atol=1e-6)  # crop only, no resize
    # Resizing: a flat image stays flat; the output has the asked size.
    torch.testing.assert_close(ds[0][0], torch.full((3, 4, 4), 77 / 127.5 - 1))
    small = open_dataset(tmp_path / "f", resolution=2)
    assert small[1][0].shape == (3, 2, 2)
    # Top rows are darker than bottom rows in the crop, and stay so after downscaling.
    assert float(small[1][0][:, 0].mean()) < float(small[1][0][:, 1].mean())


def test_resolution_float_images():
    ds = open_dataset("digits", resolution=16)
    x = ds[0][0]
    assert x.shape == (1, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert abs(float(x.mean()) - float(open_dataset("digits")[0][0].mean())) < 0.05


def test_xflip_and_max_size(tmp_path):
    imgs = rng_images(5, 4, 4, seed=7)
    path = make_edm_zip(tmp_path / "z.zip", imgs, [0, 1, 2, 3, 4])
    ds = open_dataset(path, xflip=True)
    assert len(ds) == 10
    for i in range(5):
        torch.testing.assert_close(ds[5 + i][0], ds[i][0].flip(-1))
        assert ds[5 + i][1] == ds[i][1] == i
    assert not torch.equal(ds[5][0], ds[0][0])
    sub = open_dataset(path, max_size=3)
    picked = [sub[i][1] for i in range(3)]
    assert len(sub) == 3 and picked == sorted(picked) and len(set(picked)) == 3
    assert picked == [open_dataset(path, max_size=3)[i][1] for i in range(3)]  # deterministic
    assert len(open_dataset(path, max_size=3, xflip=True)) == 6
    with pytest.raises(IndexError):
        ds[10]


# --------------------------------------------------------------------------------------------------
# Convert round trip and the CLI


def test_convert_round_trip(tmp_path, capsys):
    imgs = rng_images(3, 6, 6, seed=8)
    for i, img in enumerate(imgs):
        save_image(tmp_path / "src" / f"{i}.png", img)
    labels = {"labels": [[f"{i}.png", 2 * i] for i in range(3)]}
    (tmp_path / "src" / "dataset.json").write_text(json.dumps(labels))
    dest = tmp_path / "out" / "data.zip"
    assert cli_main(["dataset", "convert", str(tmp_path / "src"), str(dest)]) == 0
    with zipfile.ZipFile(dest) as zf:
        names = sorted(zf.namelist())
        meta = json.loads(zf.read("dataset.json"))
    assert names == [f"00000/img0000000{i}.png" for i in range(3)] + ["dataset.json"]
    assert meta["labels"] == [[edm_zip_name(i), 2 * i] for i in range(3)]
    src, out = open_dataset(tmp_path / "src"), open_dataset(dest)
    for i in range(3):
        torch.testing.assert_close(out[i][0], src[i][0], rtol=0, atol=0)
        assert out[i][1] == src[i][1] == 2 * i
    assert not [p for p in dest.parent.iterdir() if p.name != "data.zip"]  # no temp file left behind

    # Resized, unlabelled, from digits; then `info` reads it.
    small = tmp_path / "digits16.zip"
    assert cli_main(["dataset", "convert", "digits", str(small), "--resolution", "16", "--max-size", "5",
                     "--no-labels"]) == 0
    ds = open_dataset(small)
    assert len(ds) == 5 and ds.shape == (1, 16, 16) and ds.label_dim == 0
    ref = open_dataset("digits", resolution=16, max_size=5)
    assert (ds[4][0] - ref[4][0]).abs().max() <= 1 / 127.5 + 1e-6  # PNG quantisation only
    capsys.readouterr()
    assert cli_main(["dataset", "info", str(dest), "--check"]) == 0
    text = capsys.readouterr().out
    assert "items:   3 images" in text and "(3, 6, 6)" in text and "5 classes" in text
    assert cli_main(["dataset", "convert", "digits", str(tmp_path / "x.tar")]) == 2
    assert cli_main(["dataset", "info", str(tmp_path / "missing")]) == 1


# --------------------------------------------------------------------------------------------------
# Bad input: one clear DiffdistillError naming the file


def test_bad_paths_and_specs(tmp_path):
    with pytest.raises(DiffdistillError, match=r"nope\.zip: no such file"):
        open_dataset(tmp_path / "nope.zip")
    with pytest.raises(DiffdistillError, match="unknown data set spec 'imagenet'"):
        open_dataset("imagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffdistillError, match="empty: no images"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DiffdistillError, match=r"a\.txt: unknown data set format"):
        open_dataset(tmp_path / "a.txt")
    with pytest.raises(DiffdistillError, match="unknown option 'split'"):
        open_dataset("digits?split=test")
    with pytest.raises(DiffdistillError, match="unknown split 'val'"):
        open_dataset("toy:ring8", split="val")


def test_truncated_and_unreadable_images(tmp_path):
    imgs = rng_images(3, 16, 16, seed=9)
    save_image(tmp_path / "f" / "0.png", imgs[0])
    save_image(tmp_path / "f" / "1.png", imgs[1])
    data = (tmp_path / "f" / "1.png").read_bytes()
    (tmp_path / "f" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    ds = open_dataset(tmp_path / "f")                                  # lazy: opens fine
    with pytest.raises(DiffdistillError, match=r"1\.png: unreadable image"):
        ds[1]
    with pytest.raises(DiffdistillError, match=r"1\.png: unreadable image"):
        open_dataset(tmp_path / "f", check=True)                       # the header check finds it on open
    (tmp_path / "f" / "1.png").write_bytes(b"garbage, not a png")
    with pytest.raises(DiffdistillError, match=r"1\.png: unreadable image"):
        open_dataset(tmp_path / "f", check=True)
    # In a zip, the member is named.
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as zf:
        zf.writestr("a.png", encode(imgs[0]))
        zf.writestr("b.png", encode(imgs[1])[:100])
    with pytest.raises(DiffdistillError, match=r"t\.zip:b\.png: unreadable image"):
        open_dataset(tmp_path / "t.zip")[1]


def test_mixed_sizes(tmp_path):
    save_image(tmp_path / "f" / "a.png", rng_images(1, 8, 8)[0])
    save_image(tmp_path / "f" / "b.png", rng_images(1, 6, 10)[0])
    ds = open_dataset(tmp_path / "f")
    with pytest.raises(DiffdistillError, match=r"b\.png: image is 10x6 but .*a\.png is 8x8"):
        ds[1]
    with pytest.raises(DiffdistillError, match=r"b\.png: image is 10x6 but .*a\.png is 8x8"):
        open_dataset(tmp_path / "f", check=True)
    assert open_dataset(tmp_path / "f", resolution=6, check=True)[1][0].shape == (3, 6, 6)


def test_bad_zips(tmp_path):
    with zipfile.ZipFile(tmp_path / "noimg.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(DiffdistillError, match=r"noimg\.zip: no images"):
        open_dataset(tmp_path / "noimg.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DiffdistillError, match=r"bad\.zip: not a readable zip"):
        open_dataset(tmp_path / "bad.zip")
    cases = {"json": "{labels: oops", "key": json.dumps({"lbls": []}),
             "entry": json.dumps({"labels": [["a.png", "cat"]]}), "missing": json.dumps({"labels": []})}
    for name, text in cases.items():
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as zf:
            zf.writestr("a.png", encode(rng_images(1, 4, 4)[0]))
            zf.writestr("dataset.json", text)
        pattern = rf"{name}\.zip:dataset\.json: (malformed|dataset\.json has no label for a\.png)"
        with pytest.raises(DiffdistillError, match=pattern):
            open_dataset(tmp_path / f"{name}.zip")


def test_bad_npz(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DiffdistillError, match=r"k\.npz: no array 'x'"):
        open_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 4, 4, 5), np.uint8))
    with pytest.raises(DiffdistillError, match=r"s\.npz: array 'x' of shape \(2, 4, 4, 5\)"):
        open_dataset(tmp_path / "s.npz")
    np.savez(tmp_path / "r.npz", x=np.full((2, 4, 4), 3.0))
    with pytest.raises(DiffdistillError, match=r"r\.npz: float images must lie in"):
        open_dataset(tmp_path / "r.npz")
    np.savez(tmp_path / "y.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DiffdistillError, match=r"y\.npz: 'y' must hold 2 class indices"):
        open_dataset(tmp_path / "y.npz")
    np.savez(tmp_path / "t.npz", x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DiffdistillError, match=r"t\.npz: no array 'x_test'"):
        open_dataset(f"{tmp_path / 't.npz'}?split=test")


# --------------------------------------------------------------------------------------------------
# Real data (developers' machines only)


@pytest.mark.skipif(not (SHARED / "mnist.npz").is_file(), reason="shared MNIST data absent")
def test_shared_mnist():
    ds = open_dataset(SHARED / "mnist.npz")
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.label_dim == 10
    assert [ds[i][1] for i in range(5)] == [5, 0, 4, 1, 9]
    test = open_dataset(SHARED / "mnist.npz", split="test")
    assert len(test) == 10000 and [test[i][1] for i in range(5)] == [7, 2, 1, 0, 4]
    x = ds[0][0]
    assert float(x.min()) == -1 and float(x.max()) == 1


@pytest.mark.skipif(not (SHARED / "cifar10_test_subset2000_jpeg.npz").is_file(),
                    reason="shared CIFAR data absent")
def test_shared_cifar_subset():
    ds = open_dataset(SHARED / "cifar10_test_subset2000_jpeg.npz", xflip=True)
    assert len(ds) == 4000 and ds.shape == (3, 32, 32) and ds.label_dim == 10 and ds.resolution == 32
    assert np.bincount(ds.labels).tolist() == [400] * 10
    torch.testing.assert_close(ds[2000][0], ds[0][0].flip(-1))
