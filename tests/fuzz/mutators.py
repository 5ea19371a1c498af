"""Generators of malformed variants: each returns `Variant`s whose `mutate(box)` edits the sandbox's input."""

from __future__ import annotations

import json
import os
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from .harness import Variant

KINDS = ("empty", "directory", "fifo", "dangling symlink", "symlink loop", "symlink to /dev/zero",
         "symlink to a directory")


def _at(box: Path, rel: str) -> Path:
    return box / "in" / rel


def _clear(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        import shutil

        shutil.rmtree(p)


def replace_kind(rel: str, kind: str) -> Callable[[Path], None]:
    """Put something that is not a readable regular file where `rel` is expected."""
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        _clear(p)
        if kind == "empty":
            p.write_bytes(b"")
        elif kind == "directory":
            p.mkdir()
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "dangling symlink":
            p.symlink_to(box / "in" / "no-such-file")
        elif kind == "symlink loop":
            p.symlink_to(p.name)
        elif kind == "symlink to /dev/zero":
            p.symlink_to("/dev/zero")
        elif kind == "symlink to a directory":
            p.symlink_to(box / "cwd")
        else:
            raise ValueError(kind)
    return mutate


def kind_variants(rel: str, expect: str = "error") -> list[Variant]:
    return [Variant(f"{rel} is {kind}", replace_kind(rel, kind), expect) for kind in KINDS]


def truncate(rel: str, offset: int) -> Callable[[Path], None]:
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        data = p.read_bytes()
        p.write_bytes(data[:offset])
    return mutate


def flip(rel: str, edits: list[tuple[int, int]]) -> Callable[[Path], None]:
    """XOR the byte at each offset with a non-zero mask."""
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        data = bytearray(p.read_bytes())
        for offset, mask in edits:
            data[offset % len(data)] ^= mask
        p.write_bytes(bytes(data))
    return mutate


def write(rel: str, data: bytes | str | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace a file's bytes (a function gets the old bytes)."""
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        new = data(p.read_bytes()) if callable(data) else data
        p.write_bytes(new.encode() if isinstance(new, str) else new)
    return mutate


def edit_json(rel: str, edit: Callable[[object], object]) -> Callable[[Path], None]:
    """Replace a JSON file by `edit(its object)`, written with NaN/Infinity literals where the object has them."""
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        obj = json.loads(p.read_text())
        p.write_text(json.dumps(edit(obj), allow_nan=True))
    return mutate


def random_cuts(rel: str, rng: random.Random, n: int, intact: Callable[[bytes], int] = len) -> list[Variant]:
    """`n` truncations at random fractions of the part of the file that must be whole (`intact(data)` bytes:
    all of it by default; the used pages of an LMDB, the text of a JSON file without trailing whitespace), so
    every one is malformed ('error')."""
    out = []
    for _ in range(n):
        frac = rng.random()

        def mutate(box: Path, frac=frac) -> None:
            p = _at(box, rel)
            data = p.read_bytes()
            p.write_bytes(data[:int(intact(data) * frac)])
        out.append(Variant(f"{rel} cut at {frac:.4f} of its length", mutate, "error"))
    return out


def json_text(data: bytes) -> int:
    """The length of JSON text without its trailing whitespace (cutting only whitespace leaves it valid)."""
    return len(data.rstrip())


def random_flips(rel: str, size: int, rng: random.Random, n: int, expect: str = "any", lo: int = 0,
                 hi: int | None = None) -> list[Variant]:
    """`n` variants with 1-4 random bytes of [lo, hi) XORed with random masks."""
    hi = size if hi is None else hi
    out = []
    for _ in range(n):
        edits = [(rng.randrange(lo, hi), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
        out.append(Variant(f"{rel} flipped at {','.join(str(o) for o, _ in edits)}", flip(rel, edits), expect))
    return out


# --------------------------------------------------------------------------------------------------
# JSON

BAD_VALUES = [None, "x", [], {}, True, -1, 0, 1.5, 10**30, 2**64, -(2**63) - 1, float("nan"), float("inf"),
              float("-inf"), 1e308, [[[[]]]], "\u0000"]


def deep(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def json_paths(obj, prefix=(), limit: int = 200) -> list[tuple]:
    """Paths (tuples of keys/indices) of the values of a JSON object, breadth first, at most `limit`."""
    out, queue = [], [(obj, prefix)]
    while queue and len(out) < limit:
        value, path = queue.pop(0)
        if path:
            out.append(path)
        if isinstance(value, dict):
            queue.extend((v, path + (k,)) for k, v in value.items())
        elif isinstance(value, list):
            queue.extend((v, path + (i,)) for i, v in enumerate(value[:4]))
    return out


def _set(obj, path: tuple, value):
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def _delete(obj, path: tuple):
    target = obj
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return obj


def json_variants(rel: str, obj, rng: random.Random, n: int,
                  valid: Callable[[tuple, object], bool] = lambda path, value: True,
                  required: Callable[[tuple], bool] = lambda path: False) -> list[Variant]:
    """Whole-document variants (deep nesting, non-UTF-8, NaN literals, not an object, a huge number) and `n`
    random ones: a value replaced by one of BAD_VALUES, or removed. A replacement is 'error' unless
    `valid(path, value)` says the document stays valid (NaN and inf always are errors: strict JSON); a removal
    is 'error' where `required(path)`."""
    text = json.dumps(obj)
    out = [
        Variant(f"{rel}: nested 100,000 deep", write(rel, deep()), "error"),
        Variant(f"{rel}: nested 80 deep", write(rel, deep(80)), "error"),
        Variant(f"{rel}: not UTF-8", write(rel, b"\xff\xfe{" + text.encode("utf-16-le")), "error"),
        Variant(f"{rel}: a list", write(rel, "[1, 2, 3]"), "error"),
        Variant(f"{rel}: a number", write(rel, "3"), "error"),
        Variant(f"{rel}: empty", write(rel, ""), "error"),
        Variant(f"{rel}: NaN literal", write(rel, text[:-1] + ', "zz": NaN}' if text.endswith("}") else "NaN"),
                "error"),
        Variant(f"{rel}: 1e999", write(rel, text[:-1] + ', "zz": 1e999}' if text.endswith("}") else "1e999"),
                "error"),
        Variant(f"{rel}: a huge integer", write(rel, "9" * 100_000), "error"),
    ]
    paths = json_paths(obj)
    for _ in range(n):
        path = rng.choice(paths)
        label = ".".join(map(str, path))
        if rng.random() < 0.25:
            out.append(Variant(f"{rel}: {label} removed", edit_json(rel, lambda o, p=path: _delete(o, p)),
                               "error" if required(path) else "any"))
            continue
        value = rng.choice(BAD_VALUES)
        bad_literal = isinstance(value, float) and (value != value or value in (float("inf"), float("-inf")))
        expect = "error" if bad_literal or not valid(path, value) else "any"
        out.append(Variant(f"{rel}: {label} = {json.dumps(value, allow_nan=True)[:30]}",
                           edit_json(rel, lambda o, p=path, v=value: _set(o, p, v)), expect))
    return out


# --------------------------------------------------------------------------------------------------
# Zip (EDM zips, npz)


def zip_member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{member: (local header offset, data offset)} of a zip."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename] = (info.header_offset, info.header_offset + 30 + name_len + extra_len)
    return out


def _patch_zip(data: bytes, member: str, patch: Callable[[bytearray, int, bool], None]) -> bytes:
    """Apply `patch(buf, offset, central)` to the local header and the central directory entry of `member`."""
    buf = bytearray(data)
    name = member.encode()
    # (signature, offset of the name length, offset of the name, central?) of the two records naming a member
    for signature, len_at, name_at, central in ((b"PK\x03\x04", 26, 30, False), (b"PK\x01\x02", 28, 46, True)):
        pos = buf.find(signature)
        while pos >= 0:
            n = struct.unpack_from("<H", buf, pos + len_at)[0]
            if bytes(buf[pos + name_at:pos + name_at + n]) == name:
                patch(buf, pos, central)
            pos = buf.find(signature, pos + 4)
    return bytes(buf)


def zip_flag_encrypted(rel: str, member: str) -> Callable[[Path], None]:
    def patch(buf, pos, central):
        at = pos + (8 if central else 6)
        struct.pack_into("<H", buf, at, struct.unpack_from("<H", buf, at)[0] | 1)
    return write(rel, lambda data: _patch_zip(data, member, patch))


def zip_method(rel: str, member: str, method: int) -> Callable[[Path], None]:
    def patch(buf, pos, central):
        struct.pack_into("<H", buf, pos + (10 if central else 8), method)
    return write(rel, lambda data: _patch_zip(data, member, patch))


def zip_declared_size(rel: str, member: str, size: int) -> Callable[[Path], None]:
    """The member's uncompressed size field set to `size` (a lie), in both headers."""
    def patch(buf, pos, central):
        struct.pack_into("<I", buf, pos + (24 if central else 22), size & 0xFFFFFFFF)
    return write(rel, lambda data: _patch_zip(data, member, patch))


def zip_add(rel: str, name: str, data: bytes, compress: int = zipfile.ZIP_DEFLATED) -> Callable[[Path], None]:
    def mutate(box: Path) -> None:
        with zipfile.ZipFile(_at(box, rel), "a", compression=compress) as zf:
            zf.writestr(name, data)
    return mutate


def zip_rewrite(rel: str, edit: Callable[[dict[str, bytes]], dict[str, bytes]],
                compress: int = zipfile.ZIP_STORED) -> Callable[[Path], None]:
    """Rewrite a zip with `edit({name: bytes})`."""
    def mutate(box: Path) -> None:
        p = _at(box, rel)
        with zipfile.ZipFile(p) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        members = edit(members)
        with zipfile.ZipFile(p, "w", compression=compress) as zf:
            for n, d in members.items():
                zf.writestr(n, d)
    return mutate


def bomb(size: int) -> bytes:
    """`size` zero bytes (deflate turns them into about size / 1000 bytes: a small zip bomb)."""
    return bytes(size)


# --------------------------------------------------------------------------------------------------
# .npy members


def npy_bytes(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file with the given header dict text (padded as numpy pads it)."""
    head = header.encode("latin1")
    pad = 64 - (10 + len(head) + 1) % 64
    head = head + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + data


def npy_header(descr: str, shape: tuple, fortran: bool = False) -> str:
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
