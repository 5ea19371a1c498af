"""The twelve loaders under test: a small valid base of each (made here), the CLI command that reads it, and
its malformed variants (structured ones first, then seeded random truncations and byte flips)."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image

from .harness import Loader, Variant
from .mutators import (
    bomb,
    edit_json,
    flip,
    json_text,
    json_variants,
    kind_variants,
    npy_bytes,
    npy_header,
    random_cuts,
    random_flips,
    truncate,
    write,
    zip_add,
    zip_declared_size,
    zip_flag_encrypted,
    zip_member_offsets,
    zip_method,
    zip_rewrite,
)

RUN = ["--device", "cpu", "--no-progress"]


def _png(seed: int, size=(8, 8), mode="RGB") -> bytes:
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode).save(buf, format="png")
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRCs) and holds almost no data: a decompression bomb."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _npz_finite(path: Path, key: str = "x") -> str | None:
    if not path.is_file():
        return f"no output {path.name}"
    with np.load(path) as npz:
        x = npz[key]
    return None if np.isfinite(x).all() else f"{path.name} holds {int((~np.isfinite(x)).sum())} NaN/inf values"


def _sample_output(box: Path) -> str | None:
    return _npz_finite(box / "out" / "s.npz")


def _fill(out: list[Variant], n: int, more) -> list[Variant]:
    """Structured variants, then random ones from `more(k)` until there are n."""
    if len(out) < n:
        out += more(n - len(out))
    return out


def _split(k: int) -> tuple[int, int]:
    return k // 2, k - k // 2


# --------------------------------------------------------------------------------------------------
# 1. Image folder


def folder_base(root: Path) -> None:
    images = root / "images"
    for i, sub in enumerate(["a", "a", "b", "b"]):
        (images / sub).mkdir(parents=True, exist_ok=True)
        (images / sub / f"img{i}.png").write_bytes(_png(i))
    labels = [[f"{sub}/img{i}.png", i % 3] for i, sub in enumerate(["a", "a", "b", "b"])]
    (images / "dataset.json").write_text(json.dumps({"labels": labels}))


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_num(value, lo: float, hi: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi


def _labels_valid(path: tuple, value) -> bool:
    """Which dataset.json edits leave it valid: 'labels' null, or a label that is still a class index (a file
    name or an entry replaced by anything else loses an image's label)."""
    if len(path) == 1:
        return value is None
    return len(path) == 3 and path[2] == 1 and _is_int(value, 0, 2**20 - 1)


def _labels_variants(rel: str, rng: random.Random, n: int) -> list[Variant]:
    obj = {"labels": [[f"{sub}/img{i}.png", i % 3] for i, sub in enumerate(["a", "a", "b", "b"])]}
    out = [
        Variant(f"{rel}: no 'labels'", write(rel, "{}"), "error"),
        Variant(f"{rel}: a label of 2**40", edit_json(rel, lambda o: {**o, "labels": [[e[0], 2**40]
                                                                                     for e in o["labels"]]})),
        Variant(f"{rel}: a missing entry", edit_json(rel, lambda o: {"labels": o["labels"][1:]})),
        Variant(f"{rel}: a label -1", edit_json(rel, lambda o: {"labels": [[e[0], -1] for e in o["labels"]]})),
        Variant(f"{rel}: labels null", edit_json(rel, lambda o: {"labels": None}), "any"),
        Variant(f"{rel}: an extra entry", edit_json(rel, lambda o: {"labels": o["labels"] + [["zz.png", 1]]}),
                "any"),
        Variant(f"{rel}: 1,000,000 entries", edit_json(rel, lambda o: {"labels": o["labels"] + [
            [f"x{i}.png", 0] for i in range(1_000_000)]}), "any"),
        *kind_variants(rel),
    ]
    # removing 'labels' or an entry (or its file name or label) loses labels: malformed
    return out + json_variants(rel, obj, rng, n, _labels_valid, required=lambda path: True)


def folder_variants(rng: random.Random, n: int) -> list[Variant]:
    img = "images/a/img0.png"
    size = len(_png(0))
    out = [
        *kind_variants(img),
        Variant(f"{img}: not an image", write(img, b"hello, this is not a PNG")),
        Variant(f"{img}: 100000x100000 header", write(img, _huge_png(100_000, 100_000))),
        Variant(f"{img}: 12000x12000 header (PIL's warning zone)", write(img, _huge_png(12_000, 12_000))),
        Variant(f"{img}: 0x8 header", write(img, _huge_png(0, 8))),
        Variant(f"{img}: 16x16 (another size)", write(img, _png(7, (16, 16))), "any"),
        Variant(f"{img}: grey", write(img, _png(7, mode="L")), "any"),
        Variant("images/zz.png: a new dangling symlink",
                lambda box: (box / "in" / "images" / "zz.png").symlink_to(box / "none.png")),
        Variant("images/c.png: a FIFO among the images", lambda box: os.mkfifo(box / "in" / "images" / "c.png")),
        Variant("images/d.png: a directory named like an image",
                lambda box: (box / "in" / "images" / "d.png").mkdir()),
        Variant("images/sub: a symlink to a folder", lambda box: (box / "in" / "images" / "sub").symlink_to(
            box / "in" / "images" / "a"), "any"),
        Variant("images/e.png: a symlink to an image outside", lambda box: (box / "in" / "images" / "e.png")
                .symlink_to(box / "in" / "images" / "a" / "img0.png"), "any"),
        Variant("images: no images left", lambda box: [p.unlink() for p in (box / "in" / "images").rglob("*.png")]),
        *_labels_variants("images/dataset.json", rng, 40),
    ]

    def more(k):
        a, b = _split(k)
        return random_cuts(img, rng, a) + random_flips(img, size, rng, b, expect="error")
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 2. EDM zip


def _edm_members() -> dict[str, bytes]:
    names = [f"00000/img{i:08d}.png" for i in range(4)]
    members = {n: _png(i) for i, n in enumerate(names)}
    members["dataset.json"] = json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}).encode()
    return members


def zip_base(root: Path) -> None:
    with zipfile.ZipFile(root / "data.zip", "w", compression=zipfile.ZIP_STORED) as zf:
        for n, d in _edm_members().items():
            zf.writestr(n, d)


def zip_variants(rng: random.Random, n: int) -> list[Variant]:
    rel, img = "data.zip", "00000/img00000000.png"
    members = _edm_members()

    def with_member(name, data):
        return zip_rewrite(rel, lambda m: {**m, name: data})

    def without(name):
        return zip_rewrite(rel, lambda m: {k: v for k, v in m.items() if k != name})

    def labels(text):
        return with_member("dataset.json", text.encode() if isinstance(text, str) else text)

    out = [
        *kind_variants(rel),
        Variant("an encrypted image", zip_flag_encrypted(rel, img)),
        Variant("an encrypted dataset.json", zip_flag_encrypted(rel, "dataset.json")),
        Variant("compression method 99", zip_method(rel, img, 99)),
        Variant("compression method 99 on dataset.json", zip_method(rel, "dataset.json", 99)),
        Variant("compression method 12 (bzip2) on stored data", zip_method(rel, img, 12)),
        Variant("an image declaring 4 GiB", zip_declared_size(rel, img, 2**32 - 1)),
        Variant("an image declaring 3 bytes", zip_declared_size(rel, img, 3)),
        Variant("a 300 MB zip bomb image", zip_add(rel, "00000/bomb.png", bomb(300 << 20))),
        Variant("a 300 MB zip bomb dataset.json", zip_rewrite(rel, lambda m: {**m, "dataset.json": bomb(300 << 20)},
                                                             compress=zipfile.ZIP_DEFLATED)),
        Variant("a 40 MB zip bomb image", zip_add(rel, "00000/bomb.png", bomb(40 << 20))),
        Variant("member ../../../escape.png", with_member("../../../escape.png", _png(9)), "any"),
        Variant("member /tmp/abs.png", with_member("/tmp/abs.png", _png(9)), "any"),
        Variant("member a/../../b.png", with_member("a/../../b.png", _png(9)), "any"),
        Variant("a directory entry x.png/", with_member("x.png/", b""), "any"),
        Variant("no images", zip_rewrite(rel, lambda m: {"dataset.json": m["dataset.json"]})),
        Variant("no dataset.json", without("dataset.json"), "any"),
        Variant("an image that is text", with_member(img, b"not an image")),
        Variant("an image of 100000x100000", with_member(img, _huge_png(100_000, 100_000))),
        Variant("an empty image", with_member(img, b"")),
        Variant("deflated images", zip_rewrite(rel, lambda m: m, compress=zipfile.ZIP_DEFLATED), "any"),
        Variant("lzma images", zip_rewrite(rel, lambda m: m, compress=zipfile.ZIP_LZMA), "any"),
        Variant("an empty zip", zip_rewrite(rel, lambda m: {})),
        Variant("dataset.json nested 100,000 deep", labels("[" * 100_000 + "]" * 100_000)),
        Variant("dataset.json not UTF-8", labels(b"\xff\xfe\x00{")),
        Variant("dataset.json with NaN", labels('{"labels": NaN}')),
        Variant("dataset.json labels of strings", labels(json.dumps({"labels": [[k, "x"] for k in members
                                                                                if k.endswith(".png")]}))),
        Variant("dataset.json label 2**64", labels(json.dumps({"labels": [[k, 2**64] for k in members
                                                                         if k.endswith(".png")]}))),
        Variant("dataset.json label true", labels(json.dumps({"labels": [[k, True] for k in members
                                                                        if k.endswith(".png")]}))),
        Variant("dataset.json a list", labels("[]")),
        Variant("dataset.json missing an image", labels(json.dumps({"labels": [[k, 0] for k in members
                                                                              if k.endswith(".png")][1:]}))),
    ]
    size = sum(len(v) + 100 for v in members.values())

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a) + random_flips(rel, size, rng, b)
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 3. CIFAR tarball


def _cifar_batch(seed: int, n: int = 4, **edit) -> bytes:
    rng = np.random.RandomState(seed)
    batch = {b"batch_label": b"batch", b"labels": [int(v) for v in rng.randint(0, 10, n)],
             b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"f%d.png" % i for i in range(n)]}
    for k, v in edit.items():
        if v is _DROP:
            batch.pop(k.encode())
        else:
            batch[k.encode()] = v
    return pickle.dumps(batch, protocol=2)


_DROP = object()
CIFAR_NAMES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def _cifar_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _cifar_members(**edits) -> dict[str, bytes]:
    members = {name: _cifar_batch(i) for i, name in enumerate(CIFAR_NAMES)}
    members["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    members.update(edits)
    return members


def cifar_base(root: Path) -> None:
    _cifar_tar(root / "cifar-10-python.tar.gz", _cifar_members())


class _Evil:
    """A pickle that would run a shell command when loaded (it must be refused, never run)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def cifar_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "cifar-10-python.tar.gz"

    def tar_with(mode="w:gz", **members):
        def mutate(box):
            _cifar_tar(box / "in" / rel, _cifar_members(**members), mode)
        return mutate

    def without(name):
        def mutate(box):
            m = _cifar_members()
            del m[name]
            _cifar_tar(box / "in" / rel, m)
        return mutate

    def evil(box):
        data = pickle.dumps({b"data": _Evil(f"touch {box}/cwd/PWNED"), b"labels": [0]}, protocol=2)
        _cifar_tar(box / "in" / rel, _cifar_members(data_batch_1=data))

    def huge_member(box):
        """data_batch_1's header declares 3 GiB; the bytes that follow are the real (small) batch."""
        import gzip

        with gzip.open(box / "in" / rel, "wb") as g:
            for name, data in _cifar_members().items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data) if name != "data_batch_1" else 3 << 30
                g.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
            g.write(bytes(1024))

    b1 = "data_batch_1"
    out = [
        *kind_variants(rel),
        Variant("a pickle that runs a command", evil),
        Variant("float pixels", tar_with(data_batch_1=_cifar_batch(0, data=np.zeros((4, 3072), np.float32)))),
        Variant("pixels of 3071 values", tar_with(data_batch_1=_cifar_batch(0, data=np.zeros((4, 3071),
                                                                                           np.uint8)))),
        Variant("0-d pixels", tar_with(data_batch_1=_cifar_batch(0, data=np.uint8(3)))),
        Variant("pixels as a list", tar_with(data_batch_1=_cifar_batch(0, data=[1, 2, 3]))),
        Variant("label 10", tar_with(data_batch_1=_cifar_batch(0, labels=[10, 0, 0, 0]))),
        Variant("label -1", tar_with(data_batch_1=_cifar_batch(0, labels=[-1, 0, 0, 0]))),
        Variant("label 2**70", tar_with(data_batch_1=_cifar_batch(0, labels=[2**70, 0, 0, 0]))),
        Variant("labels as text", tar_with(data_batch_1=_cifar_batch(0, labels=["a", "b", "c", "d"]))),
        Variant("3 labels for 4 images", tar_with(data_batch_1=_cifar_batch(0, labels=[1, 2, 3]))),
        Variant("no labels", tar_with(data_batch_1=_cifar_batch(0, labels=_DROP))),
        Variant("no pixels", tar_with(data_batch_1=_cifar_batch(0, data=_DROP))),
        Variant("a batch that is a list", tar_with(data_batch_1=pickle.dumps([1, 2, 3], protocol=2))),
        Variant("a batch that is empty", tar_with(data_batch_1=b"")),
        Variant("a batch that is not a pickle", tar_with(data_batch_1=b"hello")),
        Variant("a truncated batch", tar_with(data_batch_1=_cifar_batch(0)[:100])),
        Variant("a batch pickled at protocol 5", tar_with(data_batch_1=pickle.dumps(
            {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=5)), "any"),
        Variant("data_batch_3 missing", without("data_batch_3")),
        Variant("test_batch missing", without("test_batch"), "any"),
        Variant("a member declaring 3 GiB", huge_member),
        Variant("an uncompressed tar named .tar.gz", tar_with(mode="w"), "any"),
        Variant("an xz tar named .tar.gz", tar_with(mode="w:xz"), "any"),
        Variant("a bzip2 tar named .tar.gz", tar_with(mode="w:bz2"), "any"),
        Variant("a tar of nothing", lambda box: _cifar_tar(box / "in" / rel, {})),
        Variant("gzip of text", write(rel, __import__("gzip").compress(b"hello" * 100))),
        Variant("a gzip bomb of 300 MB", write(rel, __import__("gzip").compress(bomb(300 << 20)))),
        Variant(f"{b1} a symlink member", lambda box: _cifar_symlink(box / "in" / rel)),
    ]

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a) + random_flips(rel, 2000, rng, b)
    return _fill(out, n, more)


def _cifar_symlink(path: Path) -> None:
    members = _cifar_members()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            if name == "data_batch_1":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------------
# 4. npz


def npz_base(root: Path) -> None:
    rng = np.random.RandomState(0)
    np.savez(root / "x.npz", x=rng.randint(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             y=rng.randint(0, 5, 6).astype(np.int64))


def npz_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "x.npz"
    x = np.random.RandomState(0).randint(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.random.RandomState(0).randint(0, 5, 6).astype(np.int64)

    def arrays(compressed=False, **arrs):
        def mutate(box):
            p = box / "in" / rel
            p.unlink()
            (np.savez_compressed if compressed else np.savez)(p, **arrs)
        return mutate

    def member(name, data):
        return zip_rewrite(rel, lambda m: {**m, f"{name}.npy": data})

    def header(descr, shape, payload=b"", name="x"):
        return member(name, npy_bytes(npy_header(descr, shape), payload))

    xs = x.tobytes()
    out = [
        *kind_variants(rel),
        Variant("x shape (-1, 8, 8, 3)", header("|u1", (-1, 8, 8, 3), xs)),
        Variant("x shape (10**12, 8, 8, 3)", header("|u1", (10**12, 8, 8, 3), xs)),
        Variant("x shape (2**62, 2**62)", header("|u1", (2**62, 2**62), xs)),
        Variant("x shape ()", header("|u1", (), xs[:1])),
        Variant("x shape (384,)", header("|u1", (384,), xs[:384])),
        Variant("x shape (6, 0, 8, 3)", header("|u1", (6, 0, 8, 3))),
        Variant("x shape (0, 8, 8, 3)", header("|u1", (0, 8, 8, 3))),
        Variant("x shape (6, 8, 8, 2)", header("|u1", (6, 8, 8, 2), xs[:6 * 128])),
        Variant("x shape (6, 1, 1, 1, 1, 1152)", header("|u1", (6, 1, 1, 1, 1, 192), xs[:1152])),
        Variant("x declares more than it holds", header("|u1", (7, 8, 8, 3), xs)),
        Variant("x declares less than it holds", header("|u1", (5, 8, 8, 3), xs)),
        Variant("x of objects", header("|O", (6,), b"\x00" * 48)),
        Variant("x of complex64", arrays(x=x.astype(np.complex64), y=y)),
        Variant("x of bools", arrays(x=x > 100, y=y)),
        Variant("x of strings", arrays(x=np.array([["a"] * 8] * 6), y=y)),
        Variant("x of void", header("|V8", (6, 8), xs[:384])),
        Variant("x float with NaN", arrays(x=np.where(x > 200, np.nan, x / 255).astype(np.float32), y=y)),
        Variant("x float with inf", arrays(x=np.where(x > 200, np.inf, x / 255).astype(np.float32), y=y)),
        Variant("x float in [0, 3]", arrays(x=(x / 85).astype(np.float32), y=y)),
        Variant("x int in -5..250", arrays(x=x.astype(np.int64) - 5, y=y)),
        Variant("x float16 in [0, 1]", arrays(x=(x / 255).astype(np.float16), y=y), "any"),
        Variant("x big-endian uint16", arrays(x=x.astype(">u2"), y=y), "any"),
        Variant("x fortran order", arrays(x=np.asfortranarray(x), y=y), "any"),
        Variant("x NCHW", arrays(x=x.transpose(0, 3, 1, 2).copy(), y=y), "any"),
        Variant("points with NaN", arrays(x=np.array([[0.0, 1.0], [np.nan, 2.0]] * 3, np.float32))),
        Variant("points with inf", arrays(x=np.array([[0.0, 1.0], [np.inf, 2.0]] * 3, np.float64))),
        Variant("points of complex", arrays(x=np.ones((6, 2), np.complex128))),
        Variant("points (6, 0)", arrays(x=np.ones((6, 0), np.float32))),
        Variant("y uint64 max", arrays(x=x, y=np.full(6, 2**64 - 1, np.uint64))),
        Variant("y negative", arrays(x=x, y=-y - 1)),
        Variant("y float", arrays(x=x, y=y.astype(np.float32))),
        Variant("y 2**40", arrays(x=x, y=np.full(6, 2**40, np.int64))),
        Variant("y of 5", arrays(x=x, y=y[:5])),
        Variant("y 2-D", arrays(x=x, y=y[:, None])),
        Variant("y of strings", arrays(x=x, y=np.array(["a"] * 6))),
        Variant("y of bools", arrays(x=x, y=y > 2), "any"),
        Variant("no x", arrays(z=x)),
        Variant("x_train only", arrays(x_train=x, y_train=y), "any"),
        Variant("compressed", arrays(compressed=True, x=x, y=y), "any"),
        Variant("compressed, header of (10**9, 8, 8, 3)", zip_rewrite(
            rel, lambda m: {**m, "x.npy": npy_bytes(npy_header("|u1", (10**9, 8, 8, 3)), xs)},
            compress=zipfile.ZIP_DEFLATED)),
        Variant("an encrypted x", zip_flag_encrypted(rel, "x.npy")),
        Variant("x compressed with method 99", zip_method(rel, "x.npy", 99)),
        Variant("x declaring 4 GiB", zip_declared_size(rel, "x.npy", 2**32 - 1)),
        Variant("x a 300 MB zip bomb", zip_rewrite(rel, lambda m: {**m, "x.npy": npy_bytes(
            npy_header("|u1", (300 << 20,))) + bomb(300 << 20)}, compress=zipfile.ZIP_DEFLATED)),
        Variant("x header not a dict", member("x", npy_bytes("[1, 2, 3]", xs))),
        Variant("x header garbage", member("x", npy_bytes("{'descr': '|u1', 'fortran_order': Fals", xs))),
        Variant("x header of a huge string", member("x", npy_bytes("{'descr': '|u1', 'shape': (6,), "
                                                                   "'fortran_order': False, 'x': '" + "a" * 20000
                                                                   + "'}", xs))),
        Variant("x header deeply nested", member("x", npy_bytes("(" * 5000 + ")" * 5000, xs))),
        Variant("x npy version 3.0", member("x", b"\x93NUMPY\x03\x00" + npy_bytes(npy_header("|u1", (6, 8, 8, 3)),
                                                                               xs)[8:])),
        Variant("x npy version 9.9", member("x", b"\x93NUMPY\x09\x09" + npy_bytes(npy_header("|u1", (6, 8, 8, 3)),
                                                                               xs)[8:])),
        Variant("x not npy", member("x", b"hello")),
        Variant("x empty", member("x", b"")),
        Variant("x descr nonsense", header("zz", (6, 8, 8, 3), xs)),
        Variant("x descr a struct", header("[('a', '<i4'), ('b', '<f8')]", (6,), bytes(72))),
    ]
    size = len(xs) + 48 + 500

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a) + random_flips(rel, size, rng, b)
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 5. LMDB


def lmdb_base(root: Path) -> None:
    import lmdb

    env = lmdb.open(str(root / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(6):
            txn.put(b"%04d" % i, _png(i))
    env.close()


def _lmdb_used(data: bytes) -> int:
    """The bytes of an LMDB data file its newest meta page uses ((last page + 1) x page size)."""
    psize = struct.unpack_from("<I", data, 16 + 24)[0]
    metas = [struct.unpack_from("<QQ", data, off + 16 + 24 + 96) for off in (0, psize)]
    return (max(metas, key=lambda m: m[1])[0] + 1) * psize


def lmdb_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "db/data.mdb"

    def put(key, value):
        def mutate(box):
            import lmdb

            env = lmdb.open(str(box / "in" / "db"), map_size=1 << 24)
            with env.begin(write=True) as txn:
                if value is None:
                    txn.delete(key)
                else:
                    txn.put(key, value)
            env.close()
        return mutate

    def drop_all(box):
        import lmdb

        env = lmdb.open(str(box / "in" / "db"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for k in list(txn.cursor().iternext(keys=True, values=False)):
                txn.delete(k)
        env.close()

    def page_flips(k):
        out = []
        for _ in range(k):
            edits = [(rng.randrange(4) * 4096 + rng.randrange(64), rng.randrange(1, 256))
                     for _ in range(rng.randint(1, 3))]
            out.append(Variant(f"{rel} page header flipped at {','.join(str(o) for o, _ in edits)}",
                               flip(rel, edits), "any"))
        return out

    out = [
        *kind_variants(rel),
        *[Variant(v.name, v.mutate, "any") for v in kind_variants("db/lock.mdb")],
        Variant("a value that is not an image", put(b"0002", b"not an image")),
        Variant("a value that is empty", put(b"0002", b"")),
        Variant("a value of 100000x100000", put(b"0002", _huge_png(100_000, 100_000))),
        Variant("a first value that is text", put(b"0000", b"text")),
        Variant("a key 'length' of text", put(b"length", b"many")),
        Variant("a key 'length' of 10**30", put(b"length", b"1" + b"0" * 30)),
        Variant("no entries", drop_all),
        Variant("a 2 MB value (overflow pages)", put(b"0009", _png(9, (800, 800))), "any"),
        *page_flips(30),
    ]

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a, intact=_lmdb_used) + random_flips(rel, 4 * 4096, rng, b)
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 6. gmm JSON

GMM = {"means": [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]], "stds": [0.1, 0.2, 0.3], "weights": [1.0, 2.0, 1.0]}


def gmm_base(root: Path) -> None:
    (root / "spec.json").write_text(json.dumps(GMM))


def gmm_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "spec.json"

    def spec(**edit):
        return write(rel, json.dumps({**GMM, **edit}, allow_nan=True))

    nan, inf = float("nan"), float("inf")
    out = [
        *kind_variants(rel),
        Variant("a NaN mean", spec(means=[[nan, 0.0], [1.0, 1.0], [-1.0, 2.0]])),
        Variant("an inf mean", spec(means=[[inf, 0.0], [1.0, 1.0], [-1.0, 2.0]])),
        Variant("a NaN std", spec(stds=[nan, 0.2, 0.3])),
        Variant("an inf std", spec(stds=[inf, 0.2, 0.3])),
        Variant("a NaN weight", spec(weights=[nan, 1.0, 1.0])),
        Variant("an inf weight", spec(weights=[inf, 1.0, 1.0])),
        Variant("a 1e308 mean", spec(means=[[1e308, 0.0], [1.0, 1.0], [-1.0, 2.0]]), "any"),
        Variant("a zero std", spec(stds=[0.0, 0.2, 0.3])),
        Variant("a negative std", spec(stds=[-0.1, 0.2, 0.3])),
        Variant("a negative weight", spec(weights=[-1.0, 1.0, 1.0])),
        Variant("zero weights", spec(weights=[0.0, 0.0, 0.0])),
        Variant("2 stds for 3 means", spec(stds=[0.1, 0.2])),
        Variant("4 weights for 3 means", spec(weights=[1, 1, 1, 1])),
        Variant("ragged means", spec(means=[[0.0, 0.0], [1.0], [-1.0, 2.0]])),
        Variant("empty means", spec(means=[], stds=[], weights=[])),
        Variant("a mean of strings", spec(means=[["0", "0"], [1.0, 1.0], [-1.0, 2.0]])),
        Variant("a mean of bools", spec(means=[[True, False], [1.0, 1.0], [-1.0, 2.0]])),
        Variant("means of empty lists", spec(means=[[], [], []])),
        Variant("means a number", spec(means=3)),
        Variant("means nested 6 deep", spec(means=[[[[[[0.0]]]]]] * 3)),
        Variant("stds a dict", spec(stds={"a": 1})),
        Variant("weights null", spec(weights=None)),
        Variant("no weights", write(rel, json.dumps({"means": GMM["means"], "stds": GMM["stds"]}))),
        Variant("an unknown key", spec(sigma_max=5), "error"),
        Variant("3 x 1,000,000 values", lambda box: (box / "in" / rel).write_text(json.dumps(
            {"means": [[0.0] * 1_000_000] * 3, "stds": [1.0] * 3, "weights": [1.0] * 3}))),
        Variant("1,100,000 components", lambda box: (box / "in" / rel).write_text(json.dumps(
            {"means": [[0.0]] * 1_100_000, "stds": [1.0] * 1_100_000, "weights": [1.0] * 1_100_000}))),
        Variant("a 70 MB file", lambda box: (box / "in" / rel).write_text(" " * (70 << 20) + json.dumps(GMM))),
        Variant("image-shaped means (3, 1, 2, 2)", spec(means=[[[[0.0, 1.0], [2.0, 3.0]]]] * 3), "any"),
    ]

    def valid(path, value):
        """A value of a mean, std or weight that keeps the mixture valid (bounded: see schema.GMM_SPEC)."""
        if len(path) != 3 - (path[0] != "means"):
            return False
        if path[0] == "means":
            return _is_num(value, -1e8, 1e8)
        if path[0] == "stds":
            return _is_num(value, 1e-300, 1e8) and value > 0
        return _is_num(value, 0, 1e100)
    out += json_variants(rel, GMM, rng, 40, valid, required=lambda path: len(path) == 1)

    def more(k):
        a, b = _split(k)
        size = len(json.dumps(GMM))
        return random_cuts(rel, rng, a, intact=json_text) + random_flips(rel, size, rng, b)
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 7. Snapshot (model.json + model.safetensors)


def snapshot_base(root: Path) -> None:
    import torch

    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.io import save_snapshot
    from diffdistill.networks.mlp import MLP

    torch.manual_seed(0)
    den = Precond(MLP(dim=2, hidden=16, num_layers=2, emb_channels=8), (2,))
    save_snapshot(root / "snap", den, sampling={"sampler": "heun", "steps": 2}, meta={"note": "fuzz base"})


def _snapshot_config() -> dict:
    """The model.json `snapshot_base` writes (built the same way, without writing)."""
    import torch

    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.networks.mlp import MLP

    torch.manual_seed(0)
    den = Precond(MLP(dim=2, hidden=16, num_layers=2, emb_channels=8), (2,))
    return {"denoiser": den.config(), "sampling": {"sampler": "heun", "steps": 2}, "meta": {"note": "fuzz base"}}


SAMPLER_NAMES = ("euler", "ddim", "heun", "ddpm", "dpmpp_2m", "onestep", "multistep")


def _snapshot_valid(path: tuple, value) -> bool:
    """Which edits of model.json leave a valid snapshot (the network's own options are not judged here)."""
    if path[0] == "meta":
        return path != ("meta",) or value is None or isinstance(value, dict)
    if path == ("sampling",):
        return value is None or value == {}
    if path == ("sampling", "sampler"):
        return value in SAMPLER_NAMES
    if path == ("sampling", "steps"):
        return _is_int(value, 1, 100_000)
    if path[:2] == ("denoiser", "network"):
        return True   # may or may not build: 'any'
    if path[:2] == ("denoiser", "precond") and len(path) == 3:
        key = path[2]
        if key == "sigma_data":
            return _is_num(value, 1e-300, 1e300) and value > 0
        if key == "sigma_min":
            return _is_num(value, 1e-300, 79.999) and value > 0
        if key == "sigma_max":
            return _is_num(value, 0.0021, 1e300)
        if key in ("logsnr_min", "logsnr_max"):
            return _is_num(value, -1e300, 1e300)
        if key == "extra":
            return value == {}
        if key == "prediction":
            return value in ("eps", "v", "x")   # 'both' needs the cosine kind
        return key == "kind" and value in ("edm", "boundary", "vp", "ve", "cosine")
    if path == ("denoiser", "label_dim"):
        return value == 0 and not isinstance(value, bool)
    if path == ("denoiser", "shape", 0):
        return value == 2 and not isinstance(value, bool)
    return False


def snapshot_variants(rng: random.Random, n: int) -> list[Variant]:
    cfg, weights = "snap/model.json", "snap/model.safetensors"

    def edit(fn, expect="error", name=None):
        return Variant(name or fn.__doc__, edit_json(cfg, fn), expect)

    def den(**kw):
        def fn(o):
            o["denoiser"].update(kw)
            return o
        return fn

    def pre(**kw):
        def fn(o):
            o["denoiser"]["precond"].update(kw)
            return o
        return fn

    def net(**kw):
        def fn(o):
            o["denoiser"]["network"].update(kw)
            return o
        return fn

    def recipe(r):
        def fn(o):
            o["sampling"] = r
            return o
        return fn

    def tensors(edit_fn):
        def mutate(box):
            from safetensors.torch import load_file, save_file

            p = box / "in" / weights
            save_file(edit_fn(load_file(str(p))), str(p))
        return mutate

    def first_weight(value):
        def fn(t):
            k = sorted(k for k in t if t[k].is_floating_point())[0]
            t[k] = t[k].clone()
            t[k].view(-1)[0] = value
            return t
        return fn

    def header_edit(fn):
        def mutate(box):
            p = box / "in" / weights
            data = p.read_bytes()
            hlen = struct.unpack("<Q", data[:8])[0]
            head = fn(json.loads(data[8:8 + hlen]))
            raw = json.dumps(head).encode()
            p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])
        return mutate

    def shape_of(name_shape):
        def fn(h):
            k = sorted(k for k in h if k != "__metadata__")[0]
            h[k]["shape"] = name_shape
            return h
        return fn

    def offsets(a, b):
        def fn(h):
            k = sorted(k for k in h if k != "__metadata__")[0]
            h[k]["data_offsets"] = [a, b]
            return h
        return fn

    def dtype(d):
        def fn(h):
            k = sorted(k for k in h if k != "__metadata__")[0]
            h[k]["dtype"] = d
            return h
        return fn

    import torch
    out = [
        *kind_variants(cfg),
        *kind_variants(weights),
        Variant("no model.safetensors", lambda box: (box / "in" / weights).unlink()),
        edit(lambda o: {"sampling": o["sampling"]}, name="no 'denoiser'"),
        edit(lambda o: {**o, "denoiser": None}, name="denoiser null"),
        edit(lambda o: {**o, "denoiser": []}, name="denoiser a list"),
        edit(den(type="nonsense"), name="an unknown denoiser type"),
        edit(den(type=7), name="type a number"),
        edit(lambda o: (o["denoiser"].pop("network"), o)[1], name="no 'network'"),
        edit(lambda o: (o["denoiser"].pop("precond"), o)[1], name="no 'precond'"),
        edit(lambda o: (o["denoiser"].pop("shape"), o)[1], name="no 'shape'"),
        edit(den(shape=[3]), name="shape [3] for a 2-D network"),
        edit(den(shape=[16384, 16384, 16384]), name="shape of 4e12 values"),
        edit(den(shape=[0]), name="shape [0]"),
        edit(den(shape=[-2]), name="shape [-2]"),
        edit(den(shape="2"), name="shape a string"),
        edit(den(label_dim=-1), name="label_dim -1"),
        edit(den(label_dim=2**40), name="label_dim 2**40"),
        edit(den(label_dim=10), name="label_dim 10 for an unconditional network"),
        edit(pre(sigma_data=0), name="sigma_data 0"),
        edit(pre(sigma_data=-0.5), name="sigma_data -0.5"),
        edit(pre(sigma_min=5.0, sigma_max=1.0), name="sigma_min above sigma_max"),
        edit(pre(sigma_max=0), name="sigma_max 0"),
        edit(pre(sigma_max=1e400), name="sigma_max 1e400 (inf)"),
        edit(pre(kind="weird"), name="precond kind weird"),
        edit(pre(prediction="both"), name="prediction both with kind edm"),
        edit(pre(unknown=1), name="an unknown precond field"),
        edit(net(name="transformer"), name="an unknown network"),
        edit(net(hidden=1_000_000), name="hidden 1,000,000 (4 TB of weights)"),
        edit(net(hidden=100_000_000), name="hidden 1e8"),
        edit(net(num_layers=100_000), name="num_layers 100,000"),
        edit(net(num_layers=-3), name="num_layers -3"),
        edit(net(hidden=0), name="hidden 0"),
        edit(net(dim=3), name="network dim 3 for shape [2]"),
        edit(net(embedding_type="none"), name="embedding_type none"),
        edit(net(bogus_key=1), name="an unknown network key"),
        edit(net(fourier_scale=float("nan")), name="fourier_scale NaN"),
        edit(recipe({"sampler": "magic"}), name="sampler magic"),
        edit(recipe({"sampler": "heun", "steps": 0}), name="steps 0"),
        edit(recipe({"sampler": "heun", "steps": -5}), name="steps -5"),
        edit(recipe({"sampler": "heun", "steps": 10**9}), name="steps 10**9"),
        edit(recipe({"sampler": "euler", "sigmas": [1.0, 2.0, 0.0]}), name="sigmas ascending"),
        edit(recipe({"sampler": "euler", "sigmas": [80.0, 1.0]}), name="sigmas not ending in 0"),
        edit(recipe({"sampler": "euler", "sigmas": ["a", 0]}), name="sigmas of strings"),
        edit(recipe({"sampler": "heun", "clip_denoised": True}), name="an option heun does not take"),
        edit(recipe({"sampler": "heun", "bogus": 1}), name="an unknown option"),
        edit(recipe({"sampler": "euler", "steps": 2, "clip_denoised": 0.5}), "any", "euler clipped"),
        edit(recipe("heun"), name="sampling a string"),
        edit(recipe(None), "any", "sampling null"),
        edit(lambda o: {**o, "meta": "x"}, name="meta a string"),
        edit(lambda o: {**o, "meta": None}, "any", "meta null"),
        Variant("a NaN weight", tensors(first_weight(float("nan")))),
        Variant("an inf weight", tensors(first_weight(float("inf")))),
        Variant("a 1e30 weight", tensors(first_weight(1e30)), "any"),
        Variant("a missing tensor", tensors(lambda t: {k: v for k, v in list(t.items())[1:]})),
        Variant("an extra tensor", tensors(lambda t: {**t, "extra.weight": torch.zeros(3)})),
        Variant("a tensor of another shape", tensors(lambda t: {**t, **{sorted(t)[0]: torch.zeros(7, 7)}})),
        Variant("an int tensor", tensors(lambda t: {**t, **{sorted(t)[0]: t[sorted(t)[0]].long()}})),
        Variant("float64 tensors", tensors(lambda t: {k: v.double() for k, v in t.items()}), "any"),
        Variant("bfloat16 tensors", tensors(lambda t: {k: v.bfloat16() for k, v in t.items()}), "any"),
        Variant("header: a shape of 2**40", header_edit(shape_of([2**40]))),
        Variant("header: a negative shape", header_edit(shape_of([-4]))),
        Variant("header: offsets past the end", header_edit(offsets(0, 10**12))),
        Variant("header: offsets reversed", header_edit(offsets(100, 0))),
        Variant("header: dtype F99", header_edit(dtype("F99"))),
        Variant("header: length 2**63", write(weights, lambda d: struct.pack("<Q", 2**63) + d[8:])),
        Variant("header: not JSON", write(weights, lambda d: struct.pack("<Q", 5) + b"hello" + d[13:])),
        Variant("model.json a 70 MB file", write(cfg, lambda d: d + b" " * (70 << 20))),
    ]
    needed = {("denoiser",), ("denoiser", "type"), ("denoiser", "precond"), ("denoiser", "network"),
              ("denoiser", "shape"), ("denoiser", "shape", 0), ("denoiser", "network", "name"),
              ("denoiser", "network", "dim")}
    out += json_variants(cfg, _snapshot_config(), rng, 40, _snapshot_valid, required=lambda path: path in needed)
    out.append(edit(net(hidden=60_000, num_layers=256), name="hidden 60,000 x 256 layers (3.7 TB)"))

    def more(k):
        a, b = _split(k)
        return (random_cuts(weights, rng, a // 2) + random_cuts(cfg, rng, a - a // 2, intact=json_text)
                + random_flips(weights, 600, rng, b // 2) + random_flips(weights, 3000, rng, b - b // 2, lo=600))
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 8. diffusers folder


def diffusers_base(root: Path) -> None:
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8).eval()
    unet.save_pretrained(root / "model" / "unet", safe_serialization=True)
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(root / "model" / "scheduler")


def diffusers_variants(rng: random.Random, n: int) -> list[Variant]:
    sched, ucfg = "model/scheduler/scheduler_config.json", "model/unet/config.json"
    weights = "model/unet/diffusion_pytorch_model.safetensors"

    def s(**kw):
        return Variant(f"scheduler {kw}", edit_json(sched, lambda o: {**o, **kw}))

    def u(expect="error", **kw):
        return Variant(f"unet {kw}"[:80], edit_json(ucfg, lambda o: {**o, **kw}), expect)

    def bin_weights(box):
        import torch
        from safetensors.torch import load_file

        p = box / "in" / weights
        torch.save(load_file(str(p)), p.with_name("diffusion_pytorch_model.bin"))
        p.unlink()

    def tensors(edit_fn):
        def mutate(box):
            from safetensors.torch import load_file, save_file

            p = box / "in" / weights
            save_file(edit_fn(load_file(str(p))), str(p))
        return mutate

    def nan_weight(t):
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")
        return t

    def index(obj):
        def mutate(box):
            p = box / "in" / weights
            p.unlink()
            (p.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(obj))
        return mutate

    nan = float("nan")
    out = [
        *kind_variants(sched),
        *kind_variants(ucfg),
        *kind_variants(weights),
        s(_class_name="PNDMScheduler"), s(_class_name=None), s(num_train_timesteps=0),
        s(num_train_timesteps=10**9), s(num_train_timesteps="1000"), s(num_train_timesteps=1.5),
        s(beta_start=nan), s(beta_start=-0.1), s(beta_end=2.0), s(beta_schedule="cosine"),
        s(beta_schedule=None), s(trained_betas=[0.5, nan]), s(trained_betas=[1.5, 0.2]),
        s(trained_betas="abc"), s(trained_betas=[[0.1]]), s(prediction_type="flow"), s(prediction_type=3),
        s(timestep_spacing="odd"), s(steps_offset=-5), s(steps_offset=10**7), s(clip_sample_range=nan),
        s(clip_sample=True, clip_sample_range=-1), s(thresholding=True, dynamic_thresholding_ratio=2),
        s(thresholding="yes"), s(set_alpha_to_one="no"), s(rescale_betas_zero_snr=True),
        Variant("scheduler: an unknown key", edit_json(sched, lambda o: {**o, "zz_unknown": 1}), "any"),
        u(_class_name="UNet2DConditionModel"), u(sample_size=10**9), u(sample_size=0), u(sample_size=[8]),
        u(sample_size="8"), u(block_out_channels=[8, 100_000]), u(block_out_channels=[]),
        u(block_out_channels=[8, 24]), u(layers_per_block=1000), u(layers_per_block=-1),
        u(in_channels=0), u(out_channels=6), u(down_block_types=["Nope", "Nope"]),
        u(down_block_types=["DownBlock2D"]), u(norm_num_groups=3), u(num_class_embeds=-1),
        u(num_class_embeds=10), u(attention_head_dim=0), u(act_fn="nope"), u(time_embedding_type="nope"),
        u(expect="any", zz_unknown_key=1),
        Variant("no weights", lambda box: (box / "in" / weights).unlink()),
        Variant(".bin weights", bin_weights, "any"),
        Variant(".bin weights truncated", lambda box: (bin_weights(box), truncate(
            "model/unet/diffusion_pytorch_model.bin", 300)(box))),
        Variant("a NaN weight", tensors(nan_weight)),
        Variant("a missing tensor", tensors(lambda t: dict(list(t.items())[1:]))),
        Variant("shard index without weight_map", index({"metadata": {}})),
        Variant("shard index naming ../../x", index({"weight_map": {"a": "../../x.safetensors"}})),
        Variant("shard index of numbers", index({"weight_map": {"a": 3}})),
        Variant("shard index nested 100,000 deep", lambda box: (index({})(box), (
            box / "in" / "model/unet/diffusion_pytorch_model.safetensors.index.json").write_text(
                "[" * 100_000 + "]" * 100_000))),
        Variant("shard index naming a missing shard", index({"weight_map": {"a": "missing.safetensors"}})),
        Variant("shard index naming itself", index({"weight_map": {
            "a": "diffusion_pytorch_model.safetensors.index.json"}})),
    ]
    base = json.loads(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                                  "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
                                  "prediction_type": "epsilon"}))
    out += json_variants(sched, base, rng, 15)

    def more(k):
        a, b = _split(k)
        return (random_cuts(weights, rng, a // 2) + random_cuts(ucfg, rng, a - a // 2, intact=json_text)
                + random_flips(weights, 3000, rng, b // 2) + random_flips(ucfg, 1000, rng, b - b // 2))
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 9. EDM pickle


def _edm_reference(edit: dict | None = None, weights=None):
    import torch

    from diffdistill.diffusion.denoiser import Precond, PrecondConfig
    from diffdistill.networks.unet import UNet

    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
                  channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.13)
    torch.manual_seed(0)
    net = UNet(**kwargs)
    if weights is not None:
        weights(net)
    if edit:
        net._config.update(edit)
    return Precond(net, (3, 8, 8), 0, PrecondConfig(kind="edm")).eval()


def _write_edm(path: Path, edit=None, weights=None, precond_state=None, precond_class="EDMPrecond",
               transform=None) -> None:
    from tests.test_edm_convert import _edm_pickle

    state = dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    state.update(precond_state or {})
    if transform is None:
        _edm_pickle(path, _edm_reference(edit, weights), precond_class, "pass\n", state)
        return
    tmp = path.with_suffix(".tmp")
    _edm_pickle(tmp, _edm_reference(edit, weights), precond_class, "pass\n", state)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(transform(data))


def edm_base(root: Path) -> None:
    _write_edm(root / "net.pkl")


def edm_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "net.pkl"

    def pkl(name, expect="error", **kw):
        return Variant(name, lambda box: _write_edm(box / "in" / rel, **kw), expect)

    def nan_weight(net):
        import torch

        with torch.no_grad():
            next(net.parameters()).view(-1)[0] = float("nan")

    def evil(box):
        (box / "in" / rel).write_bytes(pickle.dumps({"ema": _Evil(f"touch {box}/cwd/PWNED")}))

    def evil_builtin(box):
        (box / "in" / rel).write_bytes(b"cbuiltins\neval\n(Vopen('" + str(box / "cwd" / "PWNED").encode()
                                       + b"', 'w')\ntR.")

    out = [
        *kind_variants(rel),
        Variant("a pickle that runs os.system", evil),
        Variant("a pickle that calls builtins.eval", evil_builtin),
        Variant("a pickle of a list", write(rel, pickle.dumps([1, 2, 3]))),
        Variant("a pickle of None", write(rel, pickle.dumps(None))),
        Variant("a pickle without 'ema'", write(rel, pickle.dumps({"G": 1}))),
        Variant("not a pickle", write(rel, b"hello")),
        Variant("a 100,000-deep pickle", write(rel, b"(" * 100_000 + b"l" * 100_000 + b".")),
        Variant("a pickle declaring a 2**40-byte string", write(rel, b"\x80\x04\x8e" + struct.pack("<Q", 2**40)
                                                            + b"abc.")),
        pkl("a NaN weight", weights=nan_weight),
        pkl("sigma_max -5", precond_state=dict(sigma_max=-5.0)),
        pkl("sigma_data 0", precond_state=dict(sigma_data=0.0)),
        pkl("sigma_data NaN", precond_state=dict(sigma_data=float("nan"))),
        pkl("sigma_data a string", precond_state=dict(sigma_data="half")),
        pkl("sigma_min above sigma_max", precond_state=dict(sigma_min=100.0, sigma_max=200.0)),
        pkl("iDDPMPrecond", precond_class="iDDPMPrecond"),
        pkl("a Precond named Weird", precond_class="Weird"),
        pkl("model_channels 1,000,000", edit=dict(model_channels=1_000_000)),
        pkl("model_channels 0", edit=dict(model_channels=0)),
        pkl("model_channels -8", edit=dict(model_channels=-8)),
        pkl("model_channels 'eight'", edit=dict(model_channels="eight")),
        pkl("num_blocks 100,000", edit=dict(num_blocks=100_000)),
        pkl("channel_mult of 100 levels", edit=dict(channel_mult=[1] * 100)),
        pkl("channel_mult a string", edit=dict(channel_mult="12")),
        pkl("img_resolution 7", edit=dict(img_resolution=7)),
        pkl("img_resolution 10**9", edit=dict(img_resolution=10**9)),
        pkl("img_resolution None", edit=dict(img_resolution=None)),
        pkl("dropout NaN", edit=dict(dropout=float("nan"))),
        pkl("dropout 5", edit=dict(dropout=5.0)),
        pkl("an unknown argument", edit=dict(bogus=1)),
        pkl("attn_resolutions of 10**6", edit=dict(attn_resolutions=[10**6])),
        pkl("embedding_type weird", edit=dict(embedding_type="weird")),
        pkl("in_channels 4 (tensors of 3)", edit=dict(in_channels=4)),
    ]

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a) + random_flips(rel, 30_000, rng, b)
    return _fill(out, n, more)


# --------------------------------------------------------------------------------------------------
# 10. Reference statistics (eval --ref)


def ref_base(root: Path) -> None:
    """A digits reference (ref-stats) and a tiny 1x8x8 snapshot to evaluate against it."""
    import torch

    from diffdistill.cli.main import main
    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.io import save_snapshot
    from diffdistill.networks.unet import UNet

    assert main(["ref-stats", "digits", "--features", "digits", "--n", "64", "--out", str(root / "ref.npz"),
                 "--save-features", "--no-progress"]) == 0
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1],
               channel_mult_emb=1, num_blocks=1, attn_resolutions=[])
    save_snapshot(root / "snap", Precond(net, (1, 8, 8)), sampling={"sampler": "euler", "steps": 1})


def ref_variants(rng: random.Random, n: int) -> list[Variant]:
    rel = "ref.npz"

    def rewrite(edit):
        def mutate(box):
            p = box / "in" / rel
            with np.load(p) as npz:
                arrays = {k: npz[k] for k in npz.files}
            arrays = edit(arrays)
            p.unlink()
            np.savez(p, **arrays)
        return mutate

    def setk(key, fn):
        return rewrite(lambda a: {**a, key: fn(a[key])})

    def member(name, data):
        return zip_rewrite(rel, lambda m: {**m, f"{name}.npy": data})

    def nan_at(a):
        a = a.astype(np.float64).copy()
        a.flat[0] = np.nan
        return a

    out = [
        *kind_variants(rel),
        Variant("NaN in mu", setk("mu", nan_at)),
        Variant("NaN in sigma", setk("sigma", nan_at)),
        Variant("NaN in features", setk("features", nan_at)),
        Variant("inf in features", setk("features", lambda a: np.where(a > a.mean(), np.inf, a))),
        Variant("mu 2-D", setk("mu", lambda a: a[None])),
        Variant("sigma not square", setk("sigma", lambda a: a[:-1])),
        Variant("sigma of 3-D", setk("sigma", lambda a: a[None])),
        Variant("features 1-D", setk("features", lambda a: a[0])),
        Variant("features of another width", setk("features", lambda a: a[:, :-1])),
        Variant("mu of strings", setk("mu", lambda a: a.astype(str))),
        Variant("mu of complex", setk("mu", lambda a: a.astype(np.complex128))),
        Variant("mu of bools", setk("mu", lambda a: a > 0)),
        Variant("mu empty", setk("mu", lambda a: a[:0])),
        Variant("no mu", rewrite(lambda a: {k: v for k, v in a.items() if k != "mu"})),
        Variant("no features", rewrite(lambda a: {k: v for k, v in a.items() if k != "features"}), "any"),
        Variant("no meta", rewrite(lambda a: {k: v for k, v in a.items() if k != "meta"}), "any"),
        Variant("meta not JSON", setk("meta", lambda a: np.array("{not json"))),
        Variant("meta nested 100,000 deep", setk("meta", lambda a: np.array("[" * 100_000 + "]" * 100_000))),
        Variant("meta a list", setk("meta", lambda a: np.array("[1, 2]"))),
        Variant("meta of numbers", setk("meta", lambda a: np.arange(3))),
        Variant("meta of another feature network", setk("meta", lambda a: np.array(json.dumps(
            {**json.loads(str(a)), "feature_net": {"name": "other", "sha256": "0" * 64}})))),
        Variant("mu header (10**12,)", member("mu", npy_bytes(npy_header("<f8", (10**12,)), bytes(80)))),
        Variant("sigma header (-3, 3)", member("sigma", npy_bytes(npy_header("<f8", (-3, 3)), bytes(72)))),
        Variant("features header (2**40, 10)", member("features", npy_bytes(npy_header("<f4", (2**40, 10)),
                                                                            bytes(400)))),
        Variant("features of objects", member("features", npy_bytes(npy_header("|O", (3,)), bytes(24)))),
        Variant("an encrypted mu", zip_flag_encrypted(rel, "mu.npy")),
        Variant("mu compressed with method 99", zip_method(rel, "mu.npy", 99)),
        Variant("features a 300 MB zip bomb", zip_rewrite(rel, lambda m: {**m, "features.npy": npy_bytes(
            npy_header("<f4", (300 << 18, 1))) + bomb(300 << 20)}, compress=zipfile.ZIP_DEFLATED)),
        Variant("compressed (CRC-checked members)", zip_rewrite(rel, lambda m: m, compress=zipfile.ZIP_DEFLATED),
                "any"),
        Variant("not a zip", write(rel, b"hello")),
    ]

    def crc_flip(box):
        """A flipped byte inside a compressed member: zlib or the CRC must catch it."""
        p = box / "in" / rel
        zip_rewrite(rel, lambda m: m, compress=zipfile.ZIP_DEFLATED)(box)
        offs = zip_member_offsets(p)
        data = bytearray(p.read_bytes())
        data[offs["features.npy"][1] + 40] ^= 0x55
        p.write_bytes(bytes(data))
    out.append(Variant("a flipped byte in a deflated member", crc_flip))

    def more(k):
        a, b = _split(k)
        return random_cuts(rel, rng, a) + random_flips(rel, 40_000, rng, b)
    return _fill(out, n, more)


def _ref_output(box: Path) -> str | None:
    import re

    text = (box.parent / "stdout.txt").read_text() if (box.parent / "stdout.txt").exists() else ""
    return "a metric printed as NaN or inf" if re.search(r"\b(nan|inf)\b", text, re.IGNORECASE) else None


# --------------------------------------------------------------------------------------------------
# 11. KD pairs


def pairs_base(root: Path) -> None:
    from diffdistill.cli.main import main

    assert main(["kd-pairs", "--teacher", "toy:ring8", "--pairs", str(root / "pairs"), "--n-pairs", "64",
                 "--heldout", "16", "--shard-size", "32", "--pairs-steps", "2", "--gen-batch", "16",
                 "--no-progress", "--device", "cpu"]) == 0


def pairs_variants(rng: random.Random, n: int) -> list[Variant]:
    man, shard = "pairs/pairs.json", "pairs/train-00000.safetensors"

    def m(name, fn, expect="error"):
        return Variant(name, edit_json(man, fn), expect)

    def shards(fn):
        def edit(o):
            fn(o["shards"])
            return o
        return edit

    out = [
        *kind_variants(man),
        *[Variant(v.name, v.mutate, "any") for v in kind_variants(shard)],
        m("format 2", lambda o: {**o, "format": "diffdistill-pairs/2"}),
        m("shape [-1]", lambda o: {**o, "shape": [-1]}),
        m("shape [10**6, 10**6]", lambda o: {**o, "shape": [10**6, 10**6]}),
        m("shape a string", lambda o: {**o, "shape": "2"}),
        m("label_dim -3", lambda o: {**o, "label_dim": -3}),
        m("target_dtype int8", lambda o: {**o, "target_dtype": "int8"}),
        m("n_pairs a string", lambda o: {**o, "n_pairs": "64"}),
        m("shards a dict", lambda o: {**o, "shards": {}}),
        m("a shard named ../../escape", shards(lambda s: s[0].update(name="../../escape"))),
        m("a shard named /etc/passwd", shards(lambda s: s[0].update(name="/etc/passwd"))),
        m("a shard count of 10**15", shards(lambda s: s[0].update(count=10**15))),
        m("a shard count of -1", shards(lambda s: s[0].update(count=-1))),
        m("a shard without a name", shards(lambda s: s[0].pop("name"))),
        m("a shard count NaN", shards(lambda s: s[0].update(count=float("nan")))),
        m("shards of numbers", lambda o: {**o, "shards": [1, 2]}),
        m("no teacher", lambda o: {k: v for k, v in o.items() if k != "teacher"}),
        m("another teacher", lambda o: {**o, "teacher": "0" * 64}),
        m("seed -1", lambda o: {**o, "seed": -1}),
        m("block 0", lambda o: {**o, "block": 0}),
        m("shard_size 0", lambda o: {**o, "shard_size": 0}),
        m("an unknown key", lambda o: {**o, "zz": 1}, "any"),
        Variant(f"{shard}: not safetensors", write(shard, b"hello"), "any"),
        Variant(f"{shard}: a NaN target", write(shard, lambda d: _nan_target(d)), "any"),
    ]

    def more(k):
        a, b = _split(k)
        return ([Variant(v.name, v.mutate, "any") for v in random_cuts(shard, rng, a // 2)]
                + random_cuts(man, rng, a - a // 2, intact=json_text)
                + random_flips(shard, 1000, rng, b))
    return _fill(out, n, more)


def _nan_target(data: bytes) -> bytes:
    from safetensors.torch import load, save

    t = load(data)
    t["target"] = t["target"].clone()
    t["target"].view(-1)[0] = float("nan")
    return save(t)


# --------------------------------------------------------------------------------------------------
# 12. CLI values

TEACHER = ["train-teacher", "--data", "toy:ring8", "--out", "{box}/out/run", "--max-steps", "1", "--batch", "8",
           *RUN]
SAMPLE = ["sample", "npz", "{box}/out/s.npz", "toy:ring8", "--n", "4", *RUN]


def cli_variants(rng: random.Random, n: int) -> list[Variant]:
    out = []

    def bad(command: list[str], option: str, value: str, name_too: str | None = None):
        argv = [a for a in command]
        if option in argv:   # replace the command's own value
            i = argv.index(option)
            argv[i + 1] = value
        else:
            argv += [option, value]
        out.append(Variant(f"{command[0]} {option} {value}"[:80], None, "error", argv,
                           (option,) if name_too is None else (option, name_too)))

    numbers = ["inf", "-inf", "nan", "1e300", "-1e300", "abc", "", "0x10", "1e", "--"]
    for option in ("--kimg", "--ema", "--eval-kimg"):
        for v in numbers + ["0", "-1", "1e10"]:
            bad(TEACHER, option, v)
    for option in ("--tick-kimg", "--checkpoint-kimg", "--snapshot-kimg", "--grid-kimg"):
        for v in ("-1", "nan", "inf", "1e300", "x"):
            bad(TEACHER, option, v)
    for v in ("-1", str(2**64), str(2**32), "1.5", "nan", "x", "1e3"):
        bad(TEACHER, "--seed", v)
    for v in ("0", "-1", "1.5", "abc", str(2**70), "1e9"):
        bad(TEACHER, "--batch", v)
    for v in ("0", "-3", "x"):
        bad(TEACHER, "--batch-gpu", v)
    for v in ("0", "-1", "nan", str(2**70)):
        bad(TEACHER, "--max-steps", v)
    for v in ("bogus", "CPU", "cuda:x", "", "gpu", "cuda:99999", "cpu:0", "cuda:-1", "meta"):
        bad(TEACHER, "--device", v)
    for v in ("-1", "1000", "x"):
        bad(TEACHER, "--workers", v)
    for v in ("inf", "nan", "1e300", "-inf", "-1", "0"):
        bad(TEACHER, "--lr", v)
    for v in ("nan", "inf", "-1e300"):
        bad(TEACHER, "--warmup", v)
    for v in ("nan", "inf", "2", "-0.5"):
        bad(TEACHER, "--dropout", v)
    for v in ("0", "-1", "x", str(2**40)):
        bad(TEACHER, "--threads", v)
    for v in ("0", "-1", str(2**40)):
        bad(TEACHER, "--channels", v)
    for v in ("0", "-1", str(2**40)):
        bad(TEACHER, "--blocks", v)
    for v in ("0", "-1", "x"):
        bad(SAMPLE, "--n", v)
    for v in ("0", "-1", str(2**40)):
        bad(SAMPLE, "--steps", v)
    for v in ("-1", str(2**64), "x"):
        bad(SAMPLE, "--seed", v)
    for v in ("5-", "a", "-3", "3-1", "0-99999999999999", str(2**64)):
        bad(SAMPLE, "--seeds", v)
    for v in ("0", "-1"):
        bad(SAMPLE, "--batch", v)
    for v in ("nan", "inf", "-1", "0"):
        bad(SAMPLE, "--clip", v)
    for v in ("bogus", "cuda:x", ""):
        bad(SAMPLE, "--device", v)
    for v in ("0", "-1", "x", "99999999x99999999", "1x0", "64x"):
        bad(["dataset", "info", "digits"], "--resolution", v)
    for v in ("0", "-2", "x"):
        bad(["kd-pairs", "--teacher", "toy:ring8", "--pairs", "{box}/out/p", *RUN], "--n-pairs", v)
    for v in ("0", "-2"):
        bad(["kd-pairs", "--teacher", "toy:ring8", "--pairs", "{box}/out/p", *RUN], "--shard-size", v)
    rng.shuffle(out)
    return out[:max(n, 100)] if n < len(out) else out


# --------------------------------------------------------------------------------------------------
# The table


LOADERS: dict[str, Loader] = {
    "image folder": Loader("image folder", folder_base,
                           lambda box: ["dataset", "info", f"{box}/in/images", "--check"],
                           lambda box: (str(box / "in" / "images"),), folder_variants),
    "EDM zip": Loader("EDM zip", zip_base, lambda box: ["dataset", "info", f"{box}/in/data.zip", "--check"],
                      lambda box: (str(box / "in" / "data.zip"),), zip_variants),
    "CIFAR tarball": Loader("CIFAR tarball", cifar_base,
                            lambda box: ["dataset", "info", f"{box}/in/cifar-10-python.tar.gz"],
                            lambda box: (str(box / "in" / "cifar-10-python.tar.gz"),), cifar_variants),
    "npz": Loader("npz", npz_base, lambda box: ["dataset", "info", f"{box}/in/x.npz"],
                  lambda box: (str(box / "in" / "x.npz"),), npz_variants),
    "LMDB": Loader("LMDB", lmdb_base, lambda box: ["dataset", "info", f"{box}/in/db", "--check"],
                   lambda box: (str(box / "in" / "db"),), lmdb_variants),
    "gmm JSON": Loader("gmm JSON", gmm_base,
                       lambda box: ["sample", "npz", f"{box}/out/s.npz", f"gmm:{box}/in/spec.json", "--n", "8",
                                    "--steps", "2", *RUN],
                       lambda box: (str(box / "in" / "spec.json"),), gmm_variants, _sample_output),
    "snapshot": Loader("snapshot", snapshot_base,
                       lambda box: ["sample", "npz", f"{box}/out/s.npz", f"{box}/in/snap", "--n", "4", *RUN],
                       lambda box: (str(box / "in" / "snap"),), snapshot_variants, _sample_output),
    "diffusers folder": Loader("diffusers folder", diffusers_base,
                               lambda box: ["sample", "npz", f"{box}/out/s.npz", f"{box}/in/model", "--n", "1",
                                            "--steps", "2", *RUN],
                               lambda box: (str(box / "in" / "model"),), diffusers_variants, _sample_output),
    "EDM pickle": Loader("EDM pickle", edm_base,
                         lambda box: ["convert", "edm", f"{box}/in/net.pkl", f"{box}/out/snap"],
                         lambda box: (str(box / "in" / "net.pkl"),), edm_variants),
    "reference stats": Loader("reference stats", ref_base,
                              lambda box: ["eval", f"{box}/in/snap", "--ref", f"{box}/in/ref.npz", "--metrics",
                                           "fid,kid", "--features", "digits", "--n", "8", "--kid-subsets", "2",
                                           "--kid-subset-size", "4", "--batch", "8", *RUN],
                              lambda box: (str(box / "in" / "ref.npz"),), ref_variants, _ref_output),
    "KD pairs": Loader("KD pairs", pairs_base,
                       lambda box: ["distill", "kd", "--teacher", "toy:ring8", "--pairs", f"{box}/in/pairs", "--out",
                                    f"{box}/out/run", "--max-steps", "1", "--batch", "8", "--kimg", "0.008",
                                    "--grid-kimg", "0", *RUN],
                       lambda box: (str(box / "in" / "pairs"),), pairs_variants, writable=("in/pairs",)),
    "CLI values": Loader("CLI values", lambda root: None, lambda box: TEACHER, lambda box: (), cli_variants),
}
