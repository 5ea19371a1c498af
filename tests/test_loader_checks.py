"""Validation at the edge of every reader (diffdistill/guard.py, diffdistill/schema.py): regular files only,
declared sizes against the file and the machine before allocating, one schema per JSON kind, NaN/inf refused,
and the CLI's one-line errors for bad option values. The reference readers (numpy, safetensors, lmdb) give the
expected values of the valid cases."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill import guard, schema
from diffdistill.cli.main import main
from diffdistill.errors import DiffdistillError


def one_line(capsys, code_expected: int, *argv) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == code_expected, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Regular files only


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling", "loop", "device"])
def test_regular_file_refuses_what_could_block_or_is_no_file(tmp_path, kind):
    p = tmp_path / "x.json"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "dangling":
        p.symlink_to(tmp_path / "none")
    elif kind == "loop":
        p.symlink_to(p.name)
    else:
        p.symlink_to("/dev/zero")
    words = {"fifo": "FIFO", "directory": "a directory", "dangling": "broken symbolic link", "loop": "cannot open",
             "device": "a device file"}[kind]
    with pytest.raises(DiffdistillError, match=words) as e:
        guard.read_bytes(p, "spec")        # returns at once: nothing is opened
    assert str(p) in str(e.value)
    target = tmp_path / "real.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    assert guard.read_bytes(tmp_path / "link.json") == b"{}"   # a symlink to a regular file is followed
    (tmp_path / "big.json").write_text("x" * 11)
    with pytest.raises(DiffdistillError, match="more than the 10 accepted"):
        guard.read_bytes(tmp_path / "big.json", "spec", limit=10)
    # a limit far above any machine's memory costs nothing: the read asks for the file's size, not the limit's
    # (read(limit + 1) asked for 2^50 bytes here and failed with MemoryError)
    assert guard.read_bytes(tmp_path / "big.json", "spec", limit=1 << 50) == b"x" * 11


# --------------------------------------------------------------------------------------------------
# npz members: headers checked against the member before anything is read


def _npz_with_member(path: Path, name: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name + ".npy", data)
    return path


def _npy(descr: str, shape, payload: bytes) -> bytes:
    head = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}".encode()
    head += b" " * (64 - (11 + len(head)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + payload


def test_npz_reads_what_numpy_reads(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3))
    np.savez(tmp_path / "s.npz", a=a, b=b)
    np.savez_compressed(tmp_path / "c.npz", a=a, b=b)
    for name in ("s.npz", "c.npz"):
        with guard.NpzFile(tmp_path / name) as npz, np.load(tmp_path / name) as ref:
            assert npz.keys == sorted(ref.files)
            for k in ref.files:
                got = npz.array(k)
                assert got.dtype == ref[k].dtype and np.array_equal(got, ref[k])
        with guard.NpzFile(tmp_path / name) as npz:
            assert isinstance(npz.array("a"), np.memmap) == (name == "s.npz")   # stored members are mapped


@pytest.mark.parametrize("descr,shape,payload,match", [
    ("|u1", (-1, 4), bytes(4), "negative size"),
    ("|u1", (10**12, 8), bytes(8), "declares shape"),
    ("|u1", (5, 4), bytes(16), "truncated or damaged"),
    ("|O", (2,), bytes(16), "Python objects"),
    ("zz", (2,), bytes(2), "unreadable .npy header"),
])
def test_npz_refuses_bad_headers_before_reading(tmp_path, descr, shape, payload, match):
    path = _npz_with_member(tmp_path / "x.npz", "x", _npy(descr, shape, payload))
    with pytest.raises(DiffdistillError, match=match) as e, guard.NpzFile(path) as npz:
        npz.array("x")
    assert str(path) in str(e.value) and "'x'" in str(e.value)


def test_npz_member_limits(tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    np.savez_compressed(path, x=np.zeros((1 << 20,), np.uint8))   # 1 MiB of zeros: about 1 KB on disk
    monkeypatch.setenv("DIFFDISTILL_MAX_BYTES", str(1 << 19))
    with pytest.raises(DiffdistillError, match="declares 1,048,[0-9]+ bytes, more than the 524,288"):
        guard.NpzFile(path).array("x")
    np.savez(tmp_path / "m.npz", x=np.zeros((1 << 20,), np.uint8))   # stored: mapped, not read, so allowed
    assert isinstance(guard.NpzFile(tmp_path / "m.npz").array("x"), np.memmap)
    with pytest.raises(DiffdistillError, match="would take"):        # unless it must be read whole
        guard.NpzFile(tmp_path / "m.npz").array("x", mmap=False)
    monkeypatch.delenv("DIFFDISTILL_MAX_BYTES")
    data = bytearray(path.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):      # the encrypted flag, in both headers
        pos = data.find(sig)
        data[pos + flag_at] |= 1
    (tmp_path / "e.npz").write_bytes(bytes(data))
    with pytest.raises(DiffdistillError, match="encrypted"):
        guard.NpzFile(tmp_path / "e.npz").array("x")


# --------------------------------------------------------------------------------------------------
# safetensors headers


def test_safetensors_header_matches_the_library_and_refuses_damage(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}, str(path))
    header = guard.safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: s for k, (_, s) in header.items()}  # noqa: SIM118
    assert header["b"][0] == "BF16"
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-5])
    with pytest.raises(DiffdistillError, match=r"t.safetensors: tensor '[ab]' declares shape .* \(truncated"):
        guard.safetensors_header(tmp_path / "t.safetensors")
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(DiffdistillError, match="declares a 1,099,511,627,776-byte header"):
        guard.safetensors_header(tmp_path / "h.safetensors")


# --------------------------------------------------------------------------------------------------
# LMDB: truncated or damaged pages are refused before liblmdb maps the file


def _lmdb(path: Path, n: int = 300) -> Path:
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(b"%06d" % i, bytes([i % 256]) * (50 + i % 3000))   # small values and overflow pages
    env.close()
    return path / "data.mdb"


def test_lmdb_check_accepts_what_lmdb_reads_and_refuses_damage(tmp_path):
    import lmdb

    data_file = _lmdb(tmp_path / "db")
    guard.lmdb_check(data_file)
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        assert sum(1 for _ in txn.cursor()) == 300
    env.close()
    data = data_file.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(data[:len(data) // 2])
    with pytest.raises(DiffdistillError, match="truncated LMDB data file"):
        guard.lmdb_check(bad / "data.mdb")
    psize = struct.unpack_from("<I", data, 40)[0]      # the meta pages: 16-byte page header, then MDB_meta
    metas = [struct.unpack_from("<QQ", data, page + 136) + (struct.unpack_from("<Q", data, page + 128)[0],)
             for page in (0, psize)]
    root = max(metas, key=lambda m: m[1])[2]           # the newest meta page's main-database root
    damaged = bytearray(data)
    damaged[root * psize] ^= 0x7F                  # the root page's recorded page number
    (bad / "data.mdb").write_bytes(bytes(damaged))
    with pytest.raises(DiffdistillError, match="damaged LMDB data file"):
        guard.lmdb_check(bad / "data.mdb")


# --------------------------------------------------------------------------------------------------
# JSON: strict parsing and one schema per kind


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": 1e999}', "out of range"),
    (b'\xff{"a": 1}', "not UTF-8"),
    ('{"a": ', "malformed"),
])
def test_parse_json_is_strict(text, match):
    with pytest.raises(DiffdistillError, match=match) as e:
        schema.parse_json(text, "f.json")
    assert str(e.value).startswith("f.json: ")


def test_schema_errors_name_file_field_and_expectation():
    with pytest.raises(DiffdistillError) as e:
        schema.check({"labels": [["a.png", 1], ["b.png", -4]]}, schema.DATASET_JSON, "d/dataset.json",
                     "dataset.json")
    assert str(e.value) == ("d/dataset.json: malformed dataset.json: field labels[1][1]: expected an integer >= 0 "
                            "and <= 1048575, got -4")
    with pytest.raises(DiffdistillError, match=r"field means\[0\]\[1\]: expected a number in"):
        schema.check({"means": [[0, float("nan")]], "stds": [1], "weights": [1]}, schema.GMM_SPEC, "g.json")
    with pytest.raises(DiffdistillError, match="field weights: expected .*, got nothing"):
        schema.check({"means": [[0.0]], "stds": [1.0]}, schema.GMM_SPEC, "g.json")
    with pytest.raises(DiffdistillError, match=r"at most 1,048,576 numbers, got an array of shape \(2, 1000000\)"):
        schema.check({"means": [[0.0] * 1_000_000] * 2, "stds": [1, 1], "weights": [1, 1]}, schema.GMM_SPEC, "g")


def test_schemas_accept_what_the_project_writes(tmp_path, capsys):
    """A snapshot, a run's config.json and a pairs manifest written by the project fit their schemas."""
    run, pairs = tmp_path / "run", tmp_path / "pairs"
    assert main(["train-teacher", "--data", "toy:ring8", "--preset", "toy", "--out", str(run), "--max-steps", "1",
                 "--batch", "8", "--grid-kimg", "0", "--no-progress", "--device", "cpu"]) == 0
    assert main(["kd-pairs", "--teacher", "toy:ring8", "--pairs", str(pairs), "--n-pairs", "32", "--heldout", "8",
                 "--shard-size", "16", "--pairs-steps", "2", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    schema.load_json(run / "model" / "model.json", schema.SNAPSHOT)
    schema.load_json(run / "config.json", schema.RUN_CONFIG)
    manifest = schema.load_json(pairs / "pairs.json", schema.PAIRS_MANIFEST)
    bad = dict(manifest, shards=[dict(manifest["shards"][0], name="../../escape")])
    with pytest.raises(DiffdistillError, match=r"field shards\[0\].name: expected a string matching"):
        schema.check(bad, schema.PAIRS_MANIFEST, "pairs.json")
    config = json.loads((run / "config.json").read_text())
    config["train"]["total_kimg"] = -1
    with pytest.raises(DiffdistillError, match="field train.total_kimg: expected a finite number > 0"):
        schema.check(config, schema.RUN_CONFIG, "config.json")


# --------------------------------------------------------------------------------------------------
# Snapshots: sizes and shapes before allocating, NaN refused, errors name the file


def _mlp_snapshot(path: Path, **network) -> Path:
    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.io import save_snapshot
    from diffdistill.networks.mlp import MLP

    torch.manual_seed(0)
    save_snapshot(path, Precond(MLP(dim=2, hidden=16, num_layers=2), (2,)), {"sampler": "heun", "steps": 2})
    if network:
        cfg = json.loads((path / "model.json").read_text())
        cfg["denoiser"]["network"].update(network)
        (path / "model.json").write_text(json.dumps(cfg))
    return path


def test_snapshot_of_a_huge_network_is_refused_before_allocating(tmp_path, monkeypatch):
    from diffdistill.io import load_snapshot

    snap = _mlp_snapshot(tmp_path / "s", hidden=60_000, num_layers=256)   # 3.7 TB of weights
    with pytest.raises(DiffdistillError, match=r"model.json: the network of this config would take [0-9,.]+ GiB"):
        load_snapshot(snap)
    snap = _mlp_snapshot(tmp_path / "t", hidden=64)             # weights of another size: found in the header
    with pytest.raises(DiffdistillError, match=r"model.safetensors: tensor .* has shape .*, the config needs"):
        load_snapshot(snap)
    snap = _mlp_snapshot(tmp_path / "u")                        # a network that does not take the samples
    cfg = json.loads((snap / "model.json").read_text())
    cfg["denoiser"]["shape"] = [3]
    (snap / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffdistillError, match=r"model.json: the network of this config does not take samples of "
                                               r"shape \(3,\)"):
        load_snapshot(snap)


def test_snapshot_with_nan_weights_or_bad_precond_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    snap = _mlp_snapshot(tmp_path / "s")
    tensors = load_file(str(snap / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(snap / "model.safetensors"))
    line = one_line(capsys, 1, "sample", "npz", tmp_path / "o.npz", snap, "--n", "2", "--device", "cpu",
                    "--no-progress")
    assert f"{snap / 'model.safetensors'}: tensor '{name}' holds 1 NaN or inf values" in line
    assert not (tmp_path / "o.npz").exists()
    snap = _mlp_snapshot(tmp_path / "z")
    cfg = json.loads((snap / "model.json").read_text())
    cfg["denoiser"]["precond"]["sigma_data"] = 0
    (snap / "model.json").write_text(json.dumps(cfg))
    line = one_line(capsys, 1, "sample", "npz", tmp_path / "o.npz", snap, "--n", "2", "--device", "cpu")
    assert "field denoiser.precond.sigma_data: expected a finite number > 0, got 0" in line


def test_sampling_that_produces_nan_is_an_error_naming_the_model(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    snap = _mlp_snapshot(tmp_path / "s")
    tensors = {k: (v * 1e30 if v.is_floating_point() else v) for k, v in
               load_file(str(snap / "model.safetensors")).items()}    # finite weights, overflowing outputs
    save_file(tensors, str(snap / "model.safetensors"))
    line = one_line(capsys, 1, "sample", "npz", tmp_path / "o.npz", snap, "--n", "2", "--device", "cpu",
                    "--no-progress")
    assert f"{snap}: sampling produced" in line and "NaN or inf" in line
    assert not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------------------------------
# Data: folders, zips and training-time decode errors


def _png(i: int) -> bytes:
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.RandomState(i).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "png")
    return buf.getvalue()


def test_folder_entries_that_are_not_images_are_errors_not_skipped(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
    os.mkfifo(folder / "3.png")
    line = one_line(capsys, 1, "dataset", "info", folder)
    assert f"{folder / '3.png'}: image is a FIFO (named pipe), expected a regular file" in line
    (folder / "3.png").unlink()
    (folder / "3.png").symlink_to(tmp_path / "gone.png")
    assert "broken symbolic link" in one_line(capsys, 1, "dataset", "info", folder)
    (folder / "3.png").unlink()
    (folder / "dataset.json").mkdir()       # labels that cannot be read are an error, not "no labels"
    assert f"{folder / 'dataset.json'}: dataset.json is a directory" in one_line(capsys, 1, "dataset", "info", folder)
    (folder / "dataset.json").rmdir()
    data = _png(0)
    (folder / "0.png").write_bytes(data[:-2])    # only the IEND checksum missing: PIL alone decodes it all
    assert "truncated PNG" in one_line(capsys, 1, "dataset", "info", folder, "--check")


def test_zip_members_are_checked_before_reading(tmp_path, capsys, monkeypatch):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png(0))
        zf.writestr("b.png", bytes(300 << 20))          # a 300 MB member: a zip bomb of 300 KB
    monkeypatch.setenv("DIFFDISTILL_MAX_BYTES", str(256 << 20))
    line = one_line(capsys, 1, "dataset", "info", path)
    assert f"{path}:b.png: zip member declares 314,572,800 bytes, more than the 268,435,456 accepted" in line


def test_an_item_that_fails_to_decode_in_training_names_the_file(tmp_path, capsys):
    """Decoding is per item at training time: an image damaged after the data set was opened stops training with
    one line naming it (also from a DataLoader worker, whose error arrives wrapped in its traceback)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(i))
    from diffdistill.data import open_dataset

    ds = open_dataset(folder)
    (folder / "2.png").write_bytes(_png(2)[:40])
    with pytest.raises(DiffdistillError, match=f"{folder / '2.png'}: unreadable image"):
        ds[2]
    for workers in ("0", "1"):
        line = one_line(capsys, 1, "train-teacher", "--data", folder, "--preset", "digits", "--out",
                        tmp_path / f"run{workers}", "--max-steps", "2", "--batch", "4", "--workers", workers,
                        "--grid-kimg", "0", "--no-progress", "--device", "cpu")
        assert f"{folder / '2.png'}: unreadable image" in line, line


# --------------------------------------------------------------------------------------------------
# Option values: one line naming the option


@pytest.mark.parametrize("option,value", [
    ("--kimg", "inf"), ("--kimg", "nan"), ("--kimg", "-1"), ("--seed", str(2**64)), ("--seed", "-1"),
    ("--lr", "1e300"), ("--lr", "nan"), ("--lr", "-1"), ("--device", "bogus"), ("--batch", "0"),
    ("--tick-kimg", "inf"), ("--workers", "-1"), ("--dropout", "2"), ("--channels", str(2**40)),
])
def test_bad_option_values_are_one_line_usage_errors(capsys, tmp_path, option, value):
    line = one_line(capsys, 2, "train-teacher", "--data", "toy:ring8", "--out", tmp_path / "r", "--max-steps", "1",
                    option, value)
    assert option in line
    assert not (tmp_path / "r").exists()


def test_usage_errors_print_one_line_not_the_usage_block(capsys):
    line = one_line(capsys, 2, "distill", "di", "--teacher", "toy:ring8", "--out", "x", "--bogus")
    assert line.startswith("diffdistill distill di: error: unrecognized arguments: --bogus")
    assert "see diffdistill distill di --help" in line
    line = one_line(capsys, 2, "sample", "npz", "x.npz", "toy:ring8", "--seeds", "0-99999999")
    assert "--seeds" in line and "at most 10,000,000" in line
    line = one_line(capsys, 2, "sample", "npz", "x.npz", "toy:ring8", "--seeds", "0-99999999999")
    assert "--seeds" in line and "[0, 2**32)" in line


# --------------------------------------------------------------------------------------------------
# Reference statistics: NaN refused, a damaged file found by its checksum


def test_reference_files_are_checked(tmp_path):
    from diffdistill.metrics.fid import feature_stats, load_ref_extras, load_ref_stats, save_ref_stats

    f = np.random.RandomState(0).randn(4000, 5)
    mu, sigma = feature_stats(f)
    path = save_ref_stats(tmp_path / "ref.npz", mu, sigma, features=f, meta={"n": 4000})
    got_mu, got_sigma = load_ref_stats(path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert np.array_equal(load_ref_extras(path)[0], f.astype(np.float32))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("features.npy")
    # One bit of one feature, deep in an 80 KB member that is memory-mapped (the zip's CRC is never read):
    data[info.header_offset + 30 + len("features.npy") + 128 + 50_003] ^= 0x01
    (tmp_path / "flip.npz").write_bytes(bytes(data))
    with pytest.raises(DiffdistillError, match=r"flip\.npz: checksum mismatch"):
        load_ref_stats(tmp_path / "flip.npz")
    np.savez(tmp_path / "nan.npz", mu=mu, sigma=sigma, features=np.where(f > 1, np.nan, f))
    with pytest.raises(DiffdistillError, match=r"nan\.npz: 'features' holds [0-9]+ NaN or inf values"):
        load_ref_extras(tmp_path / "nan.npz")
