"""Issue 19 item 9: the data tools as EDM's dataset_tool.py and progressive distillation's prepare_data.py have them.

`dataset convert --resolution WxH --transform center-crop|center-crop-wide` (checked pixel for pixel against PIL's
own crop and Lanczos resize of the same images), labels from class folders (the ImageNet layout), LMDB output
that reads back as the zip does, the sized-key LMDB layout of prepare_data.py (`SIZE-00000` keys, several sizes,
and a `length` key) built here exactly so, `dataset info`'s warning on mixed sizes, and `convert`'s refusal of an
existing DEST without --force, atomic output and one-line errors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffdistill.cli.main import build_parser
from diffdistill.cli.main import main as cli_main
from diffdistill.data import open_dataset
from diffdistill.data.images import center_crop_wide, parse_resolution
from diffdistill.errors import DiffdistillError

LANCZOS = PIL.Image.Resampling.LANCZOS


def noise(h: int, w: int, seed: int, c: int = 3) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)
    return a[:, :, 0] if c == 1 else a


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)
    return path


def zip_images(path: Path) -> tuple[list[np.ndarray], dict]:
    """The PNGs of an EDM zip in name order (decoded by PIL) and its dataset.json."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        images = [np.asarray(PIL.Image.open(io.BytesIO(zf.read(n)))) for n in names]
        return images, json.loads(zf.read("dataset.json"))


def convert(*argv: str) -> int:
    return cli_main(["dataset", "convert", *map(str, argv), "--no-progress"])


# --------------------------------------------------------------------------------------------------
# --resolution / --transform against PIL


def test_parse_resolution():
    assert parse_resolution("64x64") == (64, 64) == parse_resolution("64") == parse_resolution(64)
    assert parse_resolution("512x384") == (512, 384) == parse_resolution("512,384") == parse_resolution((512, 384))
    for bad in ("0x4", "64x", "x64", "-1", "abc"):
        with pytest.raises(DiffdistillError, match="resolution"):
            parse_resolution(bad)


def test_center_crop_is_pil_crop_and_lanczos(tmp_path):
    """center-crop: the largest centred square (EDM's bounds (h - s) // 2 .. (h + s) // 2), resized with
    Lanczos; equal to PIL's crop + resize of the same file, exactly."""
    wide, tall = noise(30, 40, 1), noise(37, 25, 2)   # 40x30: columns 5..35; 25x37: rows 6..31 (odd margin)
    save(tmp_path / "src" / "a.png", wide)
    save(tmp_path / "src" / "b.png", tall)
    assert convert(tmp_path / "src", tmp_path / "out.zip", "--resolution", "16x16", "--transform", "center-crop") == 0
    images, meta = zip_images(tmp_path / "out.zip")
    for got, src in zip(images, (tmp_path / "src" / "a.png", tmp_path / "src" / "b.png"), strict=True):
        with PIL.Image.open(src) as img:
            w, h = img.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            want = np.asarray(img.crop(box).resize((16, 16), LANCZOS))
        np.testing.assert_array_equal(got, want)
    assert meta == {"labels": None}


def test_center_crop_wide_is_pil_band_resize_and_black_padding(tmp_path):
    """center-crop-wide to 32x16: the centred band of round(32 * h / w) rows (numpy's round half to even, as EDM),
    resized to 32x16 with Lanczos, on a black 32x32 canvas at rows 8..24. Too small images are skipped, the labels
    of the rest stay with their images."""
    cases = {"a/40x30.png": noise(30, 40, 3),    # band 24 rows from row 3
             "a/64x49.png": noise(49, 64, 4),    # 32 * 49 / 64 = 24.5 -> 24 (half to even), from row 12
             "b/20x20.png": noise(20, 20, 5),    # narrower than 32: skipped
             "b/60x20.png": noise(20, 60, 6)}    # band round(10.67) = 11 rows < 16: skipped
    for name, array in cases.items():
        save(tmp_path / "src" / name, array)
    (tmp_path / "src" / "c").mkdir()
    save(tmp_path / "src" / "c" / "33x40.png", noise(40, 33, 7))  # band round(38.8) = 39 rows from row 0
    dest = tmp_path / "wide.zip"
    assert convert(tmp_path / "src", dest, "--resolution", "32x16", "--transform", "center-crop-wide") == 0
    images, meta = zip_images(dest)
    kept = ["a/40x30.png", "a/64x49.png", "c/33x40.png"]
    assert len(images) == 3
    for got, name in zip(images, kept, strict=True):
        with PIL.Image.open(tmp_path / "src" / name) as img:
            w, h = img.size
            band = int(np.round(32 * h / w))
            top = (h - band) // 2
            want = np.zeros((32, 32, 3), np.uint8)
            want[8:24] = np.asarray(img.crop((0, top, w, top + band)).resize((32, 16), LANCZOS))
        np.testing.assert_array_equal(got, want)
    assert [label for _, label in meta["labels"]] == [0, 0, 2]     # a, a, c (class b lost both images)
    assert meta["class_names"] == ["a", "b", "c"]


def test_center_crop_wide_grey_and_float_pad_black():
    grey = noise(12, 16, 8, c=1)[:, :, None]      # 16x12 to 8x4: a band of 8 * 12 / 16 = 6 rows from row 3
    out = center_crop_wide(grey, (8, 4))
    want = np.asarray(PIL.Image.fromarray(grey[:, :, 0]).crop((0, 3, 16, 9)).resize((8, 4), LANCZOS))
    np.testing.assert_array_equal(out[2:6, :, 0], want)
    assert out.shape == (8, 8, 1) and not out[:2].any() and not out[6:].any()
    ds = open_dataset("digits", resolution=(8, 4), transform="center-crop-wide")
    x = ds[0][0]
    assert x.shape == (1, 8, 8) and float(x[:, :2].max()) == -1.0 and float(x[:, 6:].max()) == -1.0  # black


def test_resolution_without_transform_resizes_only_at_the_same_aspect(tmp_path, capsys):
    same = noise(16, 32, 9)
    save(tmp_path / "src" / "a.png", same)
    save(tmp_path / "src" / "b.png", noise(8, 16, 10))
    assert convert(tmp_path / "src", tmp_path / "r.zip", "--resolution", "12x6") == 0
    images, _ = zip_images(tmp_path / "r.zip")
    np.testing.assert_array_equal(images[0], np.asarray(PIL.Image.fromarray(same).resize((12, 6), LANCZOS)))
    assert images[1].shape == (6, 12, 3)
    save(tmp_path / "src" / "c.png", noise(16, 16, 11))
    capsys.readouterr()
    assert convert(tmp_path / "src", tmp_path / "s.zip", "--resolution", "12x6") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"c\.png: image is 16x16, not of the aspect of 12x6.*--transform", err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip", "src"]   # nothing written, no temp file


def test_option_errors_are_usage_errors(tmp_path, capsys):
    save(tmp_path / "src" / "a.png", noise(8, 8, 12))
    cases = [(["--transform", "center-crop"], "needs --resolution"),
             (["--resolution", "16x8", "--transform", "center-crop"], "center-crop makes square images"),
             (["--resolution", "8x16", "--transform", "center-crop-wide"], "width >= height"),
             (["--resolution", "0x8"], "expected WxH")]
    for extra, message in cases:
        capsys.readouterr()
        assert convert(tmp_path / "src", tmp_path / "o.zip", *extra) == 2
        assert message in capsys.readouterr().err
    assert convert(tmp_path / "src", tmp_path / "o.tar") == 2
    assert not (tmp_path / "o.zip").exists()


# --------------------------------------------------------------------------------------------------
# Labels from class folders


def test_class_folders_give_labels_and_class_names(tmp_path):
    for k, name in enumerate(["tench", "goldfish", "n01440764"]):   # sorted: goldfish, n01440764, tench
        for j in range(k + 1):
            save(tmp_path / "src" / name / f"{j}.png", noise(8, 8, 10 * k + j))
    ds = open_dataset(tmp_path / "src")
    assert ds.class_names == ["goldfish", "n01440764", "tench"] and ds.label_dim == 3
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 1, 2]
    assert convert(tmp_path / "src", tmp_path / "c.zip") == 0
    with zipfile.ZipFile(tmp_path / "c.zip") as zf:
        meta = json.loads(zf.read("dataset.json"))
    # EDM's reader takes {name: label for name, label in meta['labels']}; the class names are an extra key.
    assert {n: lab for n, lab in meta["labels"]} == {f"00000/img{i:08d}.png": lab
                                                     for i, lab in enumerate([0, 0, 1, 1, 1, 2])}
    assert meta["class_names"] == ["goldfish", "n01440764", "tench"]
    back = open_dataset(tmp_path / "c.zip")
    assert back.class_names == ds.class_names and back.labels.tolist() == ds.labels.tolist()
    assert open_dataset(tmp_path / "c.zip", max_size=1).label_dim == 3  # the names keep the class count
    # An image beside the class folders, or a dataset.json, and there are no folder labels.
    save(tmp_path / "src" / "loose.png", noise(8, 8, 99))
    assert open_dataset(tmp_path / "src").label_dim == 0
    (tmp_path / "src" / "loose.png").unlink()
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": None}))
    assert open_dataset(tmp_path / "src").label_dim == 0


def test_class_names_must_cover_the_labels(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        buf = io.BytesIO()
        PIL.Image.fromarray(noise(4, 4, 0)).save(buf, format="png")
        zf.writestr("a.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 3]], "class_names": ["x", "y"]}))
    with pytest.raises(DiffdistillError, match=r"z\.zip:dataset\.json: dataset\.json has class 3 but 2"):
        open_dataset(tmp_path / "z.zip")


# --------------------------------------------------------------------------------------------------
# LMDB: writing, and progressive distillation's prepare_data.py layout


def test_lmdb_and_folder_output_read_back_as_the_zip(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    for k, name in enumerate(["cat", "dog"]):
        for j in range(3):
            save(tmp_path / "src" / name / f"{j}.png", noise(10, 14, 10 * k + j))
    args = ["--resolution", "8x8", "--transform", "center-crop"]
    assert convert(tmp_path / "src", tmp_path / "d.zip", *args) == 0
    assert convert(tmp_path / "src", tmp_path / "d_lmdb", *args) == 0
    assert convert(tmp_path / "src", tmp_path / "d.db", *args, "--format", "lmdb") == 0
    assert convert(tmp_path / "src", tmp_path / "dfolder", *args) == 0
    ref = open_dataset(tmp_path / "d.zip")
    for other in ("d_lmdb", "dfolder"):
        ds = open_dataset(tmp_path / other)
        assert len(ds) == 6 and ds.class_names == ["cat", "dog"] and ds.labels.tolist() == ref.labels.tolist()
        for i in range(6):
            np.testing.assert_array_equal(ds.image(i), ref.image(i))
    # The layout, as prepare_data.py's readers expect it: SIZE-00000 ... and the count under 'length'.
    env = lmdb.open(str(tmp_path / "d.db"), readonly=True, lock=False)   # d.db: its reader above is another
    with env.begin() as txn:
        keys = sorted(k for k, _ in txn.cursor())
        assert txn.get(b"length") == b"6"
        png = np.asarray(PIL.Image.open(io.BytesIO(txn.get(b"8-00004"))))
    env.close()
    assert keys == sorted([f"8-{i:05d}".encode() for i in range(6)] + [b"length", b"dataset.json"])
    np.testing.assert_array_equal(png, ref.image(4))
    assert sorted(p.name for p in (tmp_path / "dfolder").iterdir()) == ["00000", "dataset.json"]


def write_prepare_data_lmdb(path: Path, images_by_size: dict[int, list[np.ndarray]], order: list[int]) -> None:
    """An LMDB in the layout of progressive distillation's prepare_data.py: per image i and size S a JPEG
    (quality 100) under f"{S}-{str(i).zfill(5)}", put in the order its worker pool finishes them, then the key
    'length' = str(count)."""
    import lmdb

    with lmdb.open(str(path), map_size=1 << 24, readahead=False) as env:
        for i in order:
            for size, images in images_by_size.items():
                buf = io.BytesIO()
                PIL.Image.fromarray(images[i]).save(buf, format="jpeg", quality=100)
                with env.begin(write=True) as txn:
                    txn.put(f"{size}-{str(i).zfill(5)}".encode(), buf.getvalue())
        with env.begin(write=True) as txn:
            txn.put(b"length", str(len(order)).encode("utf-8"))


def test_reads_the_prepare_data_lmdb_layout(tmp_path, capsys):
    """Before: '51 images' (every key, 'length' too), then 'unreadable image'. Now: `length` images of one size,
    the largest by default or `?size=S`, image i from key S-0000i."""
    pytest.importorskip("lmdb")
    n = 12
    by_size = {8: [noise(8, 8, 100 + i) for i in range(n)], 16: [noise(16, 16, 200 + i) for i in range(n)]}
    order = list(np.random.default_rng(0).permutation(n))
    write_prepare_data_lmdb(tmp_path / "celeba", by_size, order)

    def jpeg(a):
        buf = io.BytesIO()
        PIL.Image.fromarray(a).save(buf, format="jpeg", quality=100)
        return np.asarray(PIL.Image.open(buf))

    ds = open_dataset(tmp_path / "celeba")
    assert len(ds) == n and ds.shape == (3, 16, 16) and ds.label_dim == 0
    for i in (0, 5, 11):
        np.testing.assert_array_equal(ds.image(i), jpeg(by_size[16][i]))
    small = open_dataset(f"{tmp_path / 'celeba'}?size=8")
    assert len(small) == n and small.shape == (3, 8, 8)
    np.testing.assert_array_equal(small.image(7), jpeg(by_size[8][7]))
    assert cli_main(["dataset", "info", str(tmp_path / "celeba"), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"items:   {n} images" in out and "also sizes 8" in out and "16x16 (12)" in out
    with pytest.raises(DiffdistillError, match=r"celeba: no images of size 32 \(sizes here: 8, 16\)"):
        open_dataset(f"{tmp_path / 'celeba'}?size=32")
    # Converting it: to a zip of the 16x16 images.
    assert convert(tmp_path / "celeba", tmp_path / "celeba16.zip") == 0
    np.testing.assert_array_equal(zip_images(tmp_path / "celeba16.zip")[0][3], jpeg(by_size[16][3]))


def test_prepare_data_layout_damage_is_named(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    images = {8: [noise(8, 8, i) for i in range(3)]}
    write_prepare_data_lmdb(tmp_path / "db1", images, [0, 2])  # image 1 missing
    with pytest.raises(DiffdistillError, match=r"db1: 'length' says 2 images but there is no key 8-00001"):
        open_dataset(tmp_path / "db1")
    write_prepare_data_lmdb(tmp_path / "db2", images, [0])
    with lmdb.open(str(tmp_path / "db2")) as env, env.begin(write=True) as txn:
        txn.put(b"length", b"two")
    with pytest.raises(DiffdistillError, match=r"db2: the 'length' entry is b'two', not a count"):
        open_dataset(tmp_path / "db2")
    write_prepare_data_lmdb(tmp_path / "db3", images, [0])
    with lmdb.open(str(tmp_path / "db3")) as env, env.begin(write=True) as txn:
        txn.put(b"8-00000-landmark", b"xx")
    with pytest.raises(DiffdistillError, match=r"db3: key b'8-00000-landmark' is not SIZE-INDEX"):
        open_dataset(tmp_path / "db3")


# --------------------------------------------------------------------------------------------------
# info: mixed sizes; convert: existing DEST, atomic output, bad images


def test_info_warns_about_mixed_sizes(tmp_path, capsys):
    save(tmp_path / "f" / "a.png", noise(30, 40, 1))
    save(tmp_path / "f" / "b.png", noise(30, 40, 2))
    save(tmp_path / "f" / "c.png", noise(20, 20, 3))
    assert cli_main(["dataset", "info", str(tmp_path / "f")]) == 0
    captured = capsys.readouterr()
    assert "sizes:   40x30 (2), 20x20 (1)  [all 3]" in captured.out
    assert "warning: images of 2 sizes: 40x30 (2), 20x20 (1); training needs one size" in captured.err
    assert cli_main(["dataset", "info", str(tmp_path / "f"), "--check", "--resolution", "8x8",
                     "--transform", "center-crop"]) == 0
    captured = capsys.readouterr()
    assert "check:   every image header is readable\n" in captured.out and "makes them all 8x8" in captured.err
    (tmp_path / "f" / "c.png").unlink()
    assert cli_main(["dataset", "info", str(tmp_path / "f"), "--check"]) == 0
    captured = capsys.readouterr()
    assert "readable and of one size" in captured.out and "warning" not in captured.err


def test_convert_refuses_an_existing_dest_unless_force(tmp_path, capsys):
    save(tmp_path / "src" / "a.png", noise(8, 8, 1))
    dest = tmp_path / "o.zip"
    dest.write_bytes(b"old")
    assert convert(tmp_path / "src", dest) == 1
    assert "o.zip: already exists; pass --force to replace it" in capsys.readouterr().err
    assert dest.read_bytes() == b"old"
    assert convert(tmp_path / "src", dest, "--force") == 0
    assert len(zip_images(dest)[0]) == 1
    # A folder that holds something else is never replaced, even with --force.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert convert(tmp_path / "src", tmp_path / "mine", "--force") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # An LMDB replaced with --force reads as the new one, in the same process.
    if importlib.util.find_spec("lmdb") is not None:
        assert convert(tmp_path / "src", tmp_path / "x_lmdb") == 0
        assert len(open_dataset(tmp_path / "x_lmdb")) == 1
        save(tmp_path / "src" / "b.png", noise(8, 8, 2))
        assert convert(tmp_path / "src", tmp_path / "x_lmdb") == 1
        assert convert(tmp_path / "src", tmp_path / "x_lmdb", "--force") == 0
        assert len(open_dataset(tmp_path / "x_lmdb")) == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("dest", ["bad.zip", "bad_lmdb", "badfolder"])
def test_a_bad_source_image_is_one_line_and_nothing_is_written(tmp_path, capsys, dest):
    if dest.endswith("lmdb"):
        pytest.importorskip("lmdb")
    save(tmp_path / "src" / "a" / "0.png", noise(8, 8, 1))
    save(tmp_path / "src" / "b" / "1.png", noise(8, 8, 2))
    (tmp_path / "src" / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    capsys.readouterr()
    assert convert(tmp_path / "src", tmp_path / dest) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"src/b/2\.png: unreadable image", err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------------------------------
# The examples of `dataset --help`


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return out.getvalue()


def test_help_examples_parse():
    text = _help("dataset", "convert")
    section = text.split("\nexamples:\n", 1)[1].replace("\\\n", " ")
    lines = [re.sub(r"\s+", " ", ln.strip()) for ln in section.splitlines() if ln.strip().startswith("diffdistill")]
    assert len(lines) >= 8 and any("center-crop-wide" in ln for ln in lines) and any("_lmdb" in ln for ln in lines)
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert callable(args.func)
        if args.action == "convert" and args.resolution:
            parse_resolution(args.resolution)
