"""Checks at the edge of every reader, before anything is allocated or opened that could block.

- `regular_file`: what a reader opens is a regular file (symlinks followed and their target checked): a
  directory, a FIFO or a device (which could block forever or never end), a dangling symlink or a symlink loop
  is a one-line error naming the path.
- `read_bytes`: a whole small file (JSON, a pickle) read with a size cap.
- `memory_budget` / `check_alloc`: what a declared size (an array header, a config's network size, a mixture's
  components) would allocate is compared with the machine's memory before allocating it.
- `NpzFile`: `.npz` members read through their headers, checked first: not encrypted, a compression Python can
  read, a declared shape that matches the member's size (no negative, huge or truncated shapes), no object
  dtypes, at most the memory budget; uncompressed members are memory-mapped.
- `zip_member_check`: the same member checks for the images of an EDM zip.
- `safetensors_header`: a safetensors file's names, dtypes and shapes from its header, checked against the file
  size, without reading the tensors (so a config can be compared with its weights before building a network).
- `lmdb_check`: an LMDB whose data.mdb is shorter than its meta page says (a truncated copy), or whose page
  headers and nodes point outside their pages or the file, is refused before liblmdb maps it (it would read
  past the end and die of SIGBUS, or abort on an assertion).

Every error is a `DiffdistillError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .errors import DiffdistillError

MAX_SMALL_FILE = 64 << 20          # a JSON config, a manifest, a gmm spec: at most 64 MiB
MAX_MEMBER = 1 << 30               # one image in a zip, one LMDB value: at most 1 GiB (and the memory budget)
MAX_LABELS_FILE = 256 << 20        # a dataset.json (ImageNet's 1.28M labels take 40 MB)

ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma"}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """The stat of `path` (symlinks followed) when it is a regular file; else a one-line error saying what it
    is instead. Never opens the path, so a FIFO or a device cannot block."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DiffdistillError(f"{path}: {what} is a broken symbolic link (to {os.readlink(path)})") from None
        raise DiffdistillError(f"{path}: {what} not found (no such file)") from None
    except OSError as e:   # ELOOP (a symlink loop), EACCES, ENAMETOOLONG, ENOTDIR
        raise DiffdistillError(f"{path}: cannot open {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DiffdistillError(f"{path}: {what} is {_kind(st.st_mode)}, expected a regular file")
    return st


def lexists(path: str | os.PathLike) -> bool:
    """Whether anything is at `path`, a dangling symlink included (`Path.exists` says False for one)."""
    return os.path.lexists(path)


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    path = Path(path)
    st = regular_file(path, what)
    if st.st_size > limit:
        raise DiffdistillError(f"{path}: {what} has {st.st_size:,} bytes, more than the {limit:,} accepted")
    try:
        with open(path, "rb") as f:
            # read(n) allocates n bytes before it reads: ask for the size the stat gave (at most `limit`), not for
            # `limit` (by default the machine's memory, which such an allocation can be refused)
            data = f.read(st.st_size + 1)
            if len(data) > st.st_size:      # the file grew after the stat: the rest, up to the limit
                data += f.read(limit + 1 - len(data))
    except OSError as e:
        raise DiffdistillError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > limit:
        raise DiffdistillError(f"{path}: {what} is larger than the {limit:,} bytes accepted")
    return data


# --------------------------------------------------------------------------------------------------
# Memory


def memory_budget() -> int:
    """Bytes one allocation may take: $DIFFDISTILL_MAX_BYTES when set (tests), else the machine's physical
    memory."""
    env = os.environ.get("DIFFDISTILL_MAX_BYTES")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def check_alloc(nbytes: int, where, what: str) -> None:
    """Refuse `what` at `where` when it would take more than `memory_budget()` bytes."""
    budget = memory_budget()
    if nbytes > budget:
        raise DiffdistillError(f"{where}: {what} would take {nbytes / 2**30:,.1f} GiB, more than this machine's "
                               f"{budget / 2**30:,.1f} GiB of memory")


def _nbytes(shape, itemsize: int) -> int:
    return math.prod(int(s) for s in shape) * int(itemsize)


# --------------------------------------------------------------------------------------------------
# Zip members (EDM zips, npz)


def zip_member_check(info: zipfile.ZipInfo, where: str, limit: int | None = MAX_MEMBER) -> None:
    """Refuse a zip member Python cannot read (encrypted, an unsupported compression) or whose declared size is
    beyond `limit` and the memory budget (a zip bomb declares its true size; reading never goes past it); None:
    no size limit (a member that is memory-mapped, not read)."""
    if info.flag_bits & 0x1:
        raise DiffdistillError(f"{where}: encrypted zip member (not supported)")
    if info.compress_type not in ZIP_METHODS:
        raise DiffdistillError(f"{where}: zip member compressed with method {info.compress_type} (supported: "
                               f"{', '.join(ZIP_METHODS.values())})")
    if limit is not None and info.file_size > min(limit, memory_budget()):
        raise DiffdistillError(f"{where}: zip member declares {info.file_size:,} bytes, more than the "
                               f"{min(limit, memory_budget()):,} accepted")


ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError,
               NotImplementedError, struct.error, __import__("zlib").error, OverflowError)
try:
    import lzma
    ARCHIVE_ERRORS += (lzma.LZMAError,)
except ImportError:   # pragma: no cover
    pass


def open_zip(path: str | os.PathLike, what: str = "zip file") -> zipfile.ZipFile:
    """A zip file opened for reading, after `regular_file`; a damaged central directory is a one-line error."""
    regular_file(path, what)
    try:
        return zipfile.ZipFile(path)
    except ARCHIVE_ERRORS as e:
        raise DiffdistillError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None


def read_member(zf: zipfile.ZipFile, name: str, where: str, limit: int = MAX_MEMBER) -> bytes:
    """The bytes of one zip member after `zip_member_check`; a damaged member is a one-line error."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise DiffdistillError(f"{where}: no such zip member") from None
    zip_member_check(info, where, limit)
    try:
        return zf.read(info)
    except ARCHIVE_ERRORS as e:
        raise DiffdistillError(f"{where}: unreadable zip member ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# npz


class NpzFile:
    """The arrays of a `.npz`, each member's header checked before its data is read (see the module doc).

    `keys` are the array names; `header(key)` -> (shape, dtype); `array(key)` -> a memmap (stored members) or
    the array (compressed members). Use as a context manager, or `close()`."""

    def __init__(self, path: str | os.PathLike, what: str = ".npz file"):
        self.path, self.what = Path(path), what
        self.size = regular_file(self.path, what).st_size
        self._zip = open_zip(self.path, what)
        self._infos = {}
        try:
            for info in self._zip.infolist():
                if info.filename.endswith(".npy") and not info.is_dir():
                    self._infos[info.filename[:-4]] = info
        except ARCHIVE_ERRORS as e:
            self.close()
            raise DiffdistillError(f"{self.path}: not a readable {what} ({e})") from None
        self._headers: dict[str, tuple[tuple, np.dtype, bool, int]] = {}

    @property
    def keys(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, key) -> bool:
        return key in self._infos

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _where(self, key: str) -> str:
        return f"{self.path}: array {key!r}"

    def _header(self, key: str) -> tuple[tuple, np.dtype, bool, int]:
        """(shape, dtype, fortran order, header length) of a member, checked against its declared size."""
        if key in self._headers:
            return self._headers[key]
        if key not in self._infos:
            raise DiffdistillError(f"{self.path}: no array {key!r} (has {self.keys})")
        info, where = self._infos[key], self._where(key)
        zip_member_check(info, where, limit=None if info.compress_type == zipfile.ZIP_STORED else 1 << 62)
        try:
            with self._zip.open(info) as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")   # numpy warns (several lines) about Python 2 headers
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                offset = f.tell()
        except Exception as e:  # noqa: BLE001  (a damaged header raises many types: all mean "unreadable")
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DiffdistillError(f"{where}: unreadable .npy header ({msg[:200]})") from None
        if dtype.hasobject:
            raise DiffdistillError(f"{where}: holds Python objects (dtype {dtype}), which are never unpickled")
        if any(int(s) < 0 for s in shape):
            raise DiffdistillError(f"{where}: negative size in the declared shape {shape}")
        nbytes = _nbytes(shape, dtype.itemsize)
        if offset + nbytes != info.file_size:
            raise DiffdistillError(f"{where}: the header declares shape {shape} of {dtype} ({nbytes:,} bytes) but "
                                   f"the member holds {info.file_size - offset:,} bytes of data (truncated or "
                                   "damaged)")
        self._headers[key] = (tuple(int(s) for s in shape), dtype, bool(fortran), offset)
        return self._headers[key]

    def header(self, key: str) -> tuple[tuple, np.dtype]:
        shape, dtype, _, _ = self._header(key)
        return shape, dtype

    def array(self, key: str, mmap: bool = True) -> np.ndarray:
        """The array `key`: memory-mapped when stored uncompressed (and `mmap`), else read whole."""
        shape, dtype, fortran, offset = self._header(key)
        info, where = self._infos[key], self._where(key)
        order = "F" if fortran else "C"
        if info.compress_type == zipfile.ZIP_STORED and mmap and _nbytes(shape, dtype.itemsize) > 0:
            data_offset = self._data_offset(info)
            if data_offset is not None and data_offset + offset + _nbytes(shape, dtype.itemsize) <= self.size:
                try:
                    return np.memmap(self.path, dtype=dtype, mode="r", offset=data_offset + offset, shape=shape,
                                     order=order)
                except (ValueError, OSError) as e:
                    raise DiffdistillError(f"{where}: cannot map the array ({e})") from None
        check_alloc(_nbytes(shape, dtype.itemsize), where, f"shape {shape} of {dtype}")   # read whole: in memory
        try:
            with self._zip.open(info) as f:
                f.seek(offset) if f.seekable() else f.read(offset)
                data = f.read()
        except ARCHIVE_ERRORS as e:
            raise DiffdistillError(f"{where}: unreadable zip member ({type(e).__name__}: {e})") from None
        if len(data) != _nbytes(shape, dtype.itemsize):
            raise DiffdistillError(f"{where}: holds {len(data):,} bytes of data, the header declares "
                                   f"{_nbytes(shape, dtype.itemsize):,} (truncated)")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)

    def _data_offset(self, info: zipfile.ZipInfo) -> int | None:
        """Where a stored member's bytes begin in the file (after its local header), or None if damaged."""
        try:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
        except OSError:
            return None
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_len + extra_len


# --------------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def safetensors_header(path: str | os.PathLike, what: str = "weights file") -> dict[str, tuple[str, tuple]]:
    """{name: (dtype, shape)} of a safetensors file from its header, every entry checked: a known dtype, a
    shape of non-negative integers whose bytes equal its byte range, every range inside the file."""
    path = Path(path)
    size = regular_file(path, what).st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"declares a {n:,}-byte header in a {size:,}-byte file")
            raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DiffdistillError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise DiffdistillError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
              and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"]))
        if not ok:
            raise DiffdistillError(f"{path}: malformed safetensors header entry for {name!r}")
        begin, end = entry["data_offsets"]
        nbytes = _nbytes(entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]])
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise DiffdistillError(f"{path}: tensor {name!r} declares shape {tuple(entry['shape'])} of "
                                   f"{entry['dtype']} at bytes {begin}..{end} of {data_size:,} (truncated or "
                                   "damaged)")
        out[name] = (entry["dtype"], tuple(entry["shape"]))
    return out


def check_finite(tensors: dict, where, what: str = "tensor") -> None:
    """Refuse NaN or inf in any floating-point tensor of `tensors` ({name: tensor}), naming the first."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DiffdistillError(f"{where}: {what} {name!r} holds {bad} NaN or inf values")


# --------------------------------------------------------------------------------------------------
# LMDB


def lmdb_check(data_file: str | os.PathLike) -> None:
    """Refuse an LMDB data file that liblmdb could not read safely. LMDB maps the file and trusts its pages:
    reading past the end of a truncated copy kills the process with SIGBUS, and a damaged page header or node
    (a wrong page number, size or offset) makes it read outside the map or abort on an assertion. So before
    liblmdb opens it, the current meta page and every branch and leaf page of the main database are walked here
    (page numbers inside the file, each page's recorded number, its bounds, every node inside its page, every
    overflow value inside the file, no cycles, the entry count the meta page declares). Only the plain layout
    that LSUN and `dataset convert` write is accepted (no sub-databases, no duplicate keys)."""
    data_file = Path(data_file)
    size = regular_file(data_file, "LMDB data file").st_size
    try:
        with open(data_file, "rb") as f:
            _lmdb_walk(f, size, data_file)
    except OSError as e:
        raise DiffdistillError(f"{data_file}: cannot read the LMDB data file ({e.strerror or e})") from None


_LMDB_MAGIC, _PAGE_HEADER, _NODE_HEADER = 0xBEEFC0DE, 16, 8
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2, _P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_P_INVALID = (1 << 64) - 1


def _lmdb_walk(f, size: int, where: Path) -> None:
    def bad(what: str):
        raise DiffdistillError(f"{where}: damaged LMDB data file ({what})")

    def meta_at(offset: int):
        f.seek(offset)
        page = f.read(16 + 136)
        if len(page) < 152:
            return None
        magic, version = struct.unpack_from("<II", page, 16)
        if magic != _LMDB_MAGIC or version != 1:
            return None
        psize = struct.unpack_from("<I", page, 16 + 24)[0]            # the free DB's md_pad holds the page size
        flags, depth = struct.unpack_from("<HH", page, 16 + 24 + 48 + 4)
        entries, root = struct.unpack_from("<QQ", page, 16 + 24 + 48 + 32)
        last_pg, txnid = struct.unpack_from("<QQ", page, 16 + 24 + 96)
        return dict(psize=psize, flags=flags, depth=depth, entries=entries, root=root, last_pg=last_pg,
                    txnid=txnid)

    first = meta_at(0)
    if first is None:
        raise DiffdistillError(f"{where}: not an LMDB data file (no LMDB meta page)")
    psize = first["psize"]
    if psize not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        bad(f"page size {psize}")
    metas = [m for m in (first, meta_at(psize)) if m is not None and m["psize"] == psize]
    meta = max(metas, key=lambda m: m["txnid"])
    last_pg = meta["last_pg"]
    if (last_pg + 1) * psize > size:
        raise DiffdistillError(f"{where}: truncated LMDB data file ({size:,} bytes, its meta page declares "
                               f"{(last_pg + 1) * psize:,})")
    if meta["flags"] & ~0x08:      # only MDB_REVERSEKEY-free plain databases: no DUPSORT, INTEGERKEY, ...
        raise DiffdistillError(f"{where}: unsupported LMDB layout (main database flags {meta['flags']:#x})")
    if meta["root"] == _P_INVALID:
        if meta["entries"]:
            bad("entries without a root page")
        return
    if meta["depth"] > 64:
        bad(f"tree depth {meta['depth']}")
    entries, seen, stack = 0, set(), [(meta["root"], 1)]
    while stack:
        pgno, depth = stack.pop()
        if not 2 <= pgno <= last_pg or pgno in seen or depth > meta["depth"]:
            bad(f"page reference {pgno}")
        seen.add(pgno)
        f.seek(pgno * psize)
        page = f.read(psize)
        if len(page) < psize:
            bad(f"page {pgno} past the end")
        stored, _pad, flags, lower, upper = struct.unpack_from("<QHHHH", page, 0)
        kind = flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2 | _P_SUBP)
        if stored != pgno or kind not in (_P_BRANCH, _P_LEAF):
            bad(f"page {pgno} records number {stored} and flags {flags:#x}")
        if not _PAGE_HEADER <= lower <= upper <= psize or (lower - _PAGE_HEADER) % 2:
            bad(f"page {pgno} bounds {lower}..{upper}")
        n = (lower - _PAGE_HEADER) // 2
        if n == 0 or (kind == _P_BRANCH) != (depth < meta["depth"]):
            bad(f"page {pgno} is a {'branch' if kind == _P_BRANCH else 'leaf'} at depth {depth}")
        for ptr in struct.unpack_from(f"<{n}H", page, _PAGE_HEADER):
            if not upper <= ptr <= psize - _NODE_HEADER:
                bad(f"node offset {ptr} in page {pgno}")
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, ptr)
            end = ptr + _NODE_HEADER + ksize
            if kind == _P_BRANCH:
                if end > psize:
                    bad(f"node of page {pgno}")
                stack.append((lo | hi << 16 | nflags << 32, depth + 1))
                continue
            dsize = lo | hi << 16
            if nflags & (_F_SUBDATA | _F_DUPDATA):
                raise DiffdistillError(f"{where}: unsupported LMDB layout (sub-databases or duplicate keys)")
            if nflags & _F_BIGDATA:
                if end + 8 > psize:
                    bad(f"node of page {pgno}")
                ovpg = struct.unpack_from("<Q", page, end)[0]
                if not 2 <= ovpg <= last_pg or ovpg * psize + _PAGE_HEADER + dsize > (last_pg + 1) * psize:
                    bad(f"value of page {pgno} at page {ovpg}")
            elif end + dsize > psize:
                bad(f"value of page {pgno}")
            entries += 1
    if entries != meta["entries"]:
        bad(f"{entries} entries, the meta page declares {meta['entries']}")
