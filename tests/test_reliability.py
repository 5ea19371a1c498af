"""What a run keeps safe (issue 18): the same command gives the same weights (--seed covers network
initialisation), a NaN/inf stops the run with the last finite checkpoint kept and says where it came from,
checkpoints carry a sha256 checked on resume (a damaged one falls back to an older intact one, saying so), and
nothing is lost: outputs are refused unless --force, --force only ever starts over a run of this project and
deletes only its own files, a run directory is locked while a run holds it, nothing is written through a link
planted inside it, and a full disk is one line with the previous file intact. Tiny CPU runs only."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import Points, Toy, config  # noqa: E402

from diffdistill import io  # noqa: E402
from diffdistill.errors import DiffdistillError  # noqa: E402
from diffdistill.teachers.analytic import ring8  # noqa: E402
from diffdistill.train import checkpoint as ckpt  # noqa: E402
from diffdistill.train.loop import train  # noqa: E402
from tests.cli_util import one_error_line, run_cli  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))




def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (links as their target)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


# --------------------------------------------------------------------------------------------------
# 7. Reproducible


TINY = ["--max-steps", "3", "--batch", "16", "--checkpoint-kimg", "0.032", "--grid-kimg", "0", "--no-progress",
        "--seed", "5"]
COMMANDS = {
    "teacher": ["train-teacher", "--data", "toy:ring8", "--preset", "toy"],
    "gdd": ["distill", "gdd", "--teacher", "toy:ring8", "--data", "toy:ring8"],
    "di": ["distill", "di", "--teacher", "toy:ring8"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_same_command_twice_gives_bit_identical_weights(tmp_path, capsys, name):
    """Fresh networks (the teacher's, GDD's discriminator and student of an analytic teacher, DI's student and
    fake score) are initialised from --seed: whatever the process did before, the weights, EMA and optimiser
    state are the same bits."""
    runs = []
    for i in range(2):
        torch.randn(7 + i)                  # a different global RNG state each time, as another process has
        np.random.rand(3 + i)
        out = tmp_path / f"run{i}"
        assert run_cli(capsys, *COMMANDS[name], "--out", out, *TINY)[0] == 0
        runs.append(out)
    a, b = (r / "model" / "model.safetensors" for r in runs)
    assert a.read_bytes() == b.read_bytes()
    (_, ja), (_, jb) = (ckpt.list_checkpoints(r)[0] for r in runs)
    assert same_tensors(ckpt.read_checkpoint(ja)[0], ckpt.read_checkpoint(jb)[0])
    # another seed gives other weights (the seed is what decides)
    out = tmp_path / "other"
    assert run_cli(capsys, *COMMANDS[name], "--out", out, *TINY[:-1], "6")[0] == 0
    assert (out / "model" / "model.safetensors").read_bytes() != a.read_bytes()


def test_seed_out_of_range_is_a_usage_error(tmp_path, capsys):
    for seed in ("-1", str(2**64)):
        code, _, err = run_cli(capsys, *COMMANDS["di"], "--out", tmp_path / "r", "--max-steps", "1", "--seed", seed)
        assert code == 2
        one_error_line(err, "--seed")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# 5. NaN and inf


class ScaledLoss(Toy):
    """Group b's loss multiplied by each of `factors` in turn from step `at` on (weights and data stay finite):
    (1e30, 1e30) overflows the loss itself to inf; (1e30,) keeps it finite, but Adam's second moment (the gradient
    squared) overflows to inf."""

    def __init__(self, at, factors, **kw):
        super().__init__(**kw)
        self.at, self.factors = at, factors

    def b_loss(self, batch):
        out = super().b_loss(batch)
        if batch.step >= self.at:
            for f in self.factors:
                out["loss"] = out["loss"] * f
        return out


def test_inf_optimiser_state_is_never_checkpointed(tmp_path):
    # a checkpoint every 2 steps, 2 kept; the overflow comes at step 4, the next checkpoint is due after step 5
    cfg = config(tmp_path, checkpoint_kimg=0.032)
    with pytest.raises(DiffdistillError) as caught:
        train(ScaledLoss(at=4, factors=(1e30,)), cfg, Points())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("non-finite state at step 6")
    assert "the optimiser state of group 'b' (optim.b." in message and "holds inf" in message
    assert message.endswith(f"the last good checkpoint {tmp_path}/run/checkpoints/ckpt-000000004.json is kept "
                            "(all are finite)")
    # the finite ones before it are still there (none pruned for a poisoned one) and read back
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 2]
    tensors, state = ckpt.load_latest(tmp_path / "run")
    assert state["step"] == 4 and not ckpt.nonfinite(tensors)
    assert not (tmp_path / "run" / "model").exists()


def test_save_checkpoint_refuses_non_finite_state(tmp_path):
    with pytest.raises(ckpt.NonFiniteState, match=r"the EMA weights \(ema\.a\.w\) holds NaN"):
        ckpt.save_checkpoint(tmp_path, 2, {"method.x": torch.zeros(3), "ema.a.w": torch.tensor([0.0, float("nan")])},
                             {"nimg": 32})
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    # a buffer may hold inf (a sentinel such as KD's best held-out loss so far), never NaN; a weight neither
    state = {"method.w": torch.ones(2), "method.best": torch.tensor(float("inf"))}
    with pytest.raises(ckpt.NonFiniteState, match=r"the weights best holds inf"):
        ckpt.save_checkpoint(tmp_path, 2, state, {"nimg": 32})
    js = ckpt.save_checkpoint(tmp_path, 2, state, {"nimg": 32}, buffers={"method.best"})
    tensors, saved = ckpt.read_checkpoint(js)
    assert saved["inf_buffers"] == ["method.best"] and tensors["method.best"] == float("inf")
    with pytest.raises(ckpt.NonFiniteState, match=r"the weights best holds NaN"):
        ckpt.save_checkpoint(tmp_path, 4, {**state, "method.best": torch.tensor(float("nan"))}, {"nimg": 64},
                             buffers={"method.best"})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]


def test_the_message_says_where_the_nan_came_from(tmp_path):
    # NaN in real data: the items and the data set are named
    data = Points()
    data.x[5] = float("nan")
    with pytest.raises(DiffdistillError, match=r"non-finite loss in group 'a' .*items \[5\] of the training data "
                                               r"pts\.npz hold NaN or inf"):
        train(Toy(), config(tmp_path, "data", meta=dict(data="pts.npz")), data)
    # a NaN weight (e.g. a teacher's): the tensor is named
    method = Toy()
    with torch.no_grad():
        method.b.backbone.out.bias[0] = float("nan")
    with pytest.raises(DiffdistillError, match=r"non-finite loss in group 'b' .*the weights b\.backbone\.out\.bias "
                                               r"holds NaN"):
        train(method, config(tmp_path, "weights"), Points())
    # neither: the loss overflowed
    with pytest.raises(DiffdistillError, match="the loss itself overflowed"):
        train(ScaledLoss(at=2, factors=(1e30, 1e30)), config(tmp_path, "loss"), Points())


def _rewrite_tensors(json_path: Path, change) -> None:
    """Rewrite a checkpoint's tensors with `change(tensors)` and record their new size and sha256 (a consistent
    but non-finite checkpoint, as an older version could have written)."""
    state = json.loads(json_path.read_text())
    path = json_path.with_suffix(".safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    state.update(tensors_bytes=path.stat().st_size, tensors_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    json_path.write_text(json.dumps(state))


def interrupted_run(tmp_path, name) -> Path:
    """A run of 10 steps interrupted after step 6 (SIGINT at 5): checkpoints [6, 4, 2]."""
    result = train(Toy(kill_at=5), config(tmp_path, name, checkpoint_kimg=0.032, keep_checkpoints=3), Points())
    assert result["interrupted"] and result["step"] == 6
    run = tmp_path / name
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 4, 2]
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tensors of the uninterrupted run of `interrupted_run`'s config."""
    tmp = tmp_path_factory.mktemp("ref")
    train(Toy(), config(tmp, "ref", checkpoint_kimg=0.032, keep_checkpoints=3), Points())
    return ckpt.load_latest(tmp / "ref")[0]


def _finish(tmp_path, name, capsys) -> tuple[dict, str]:
    train(Toy(), config(tmp_path, name, checkpoint_kimg=0.032, keep_checkpoints=3), Points())
    tensors, state = ckpt.load_latest(tmp_path / name)
    assert state["step"] == 10
    return tensors, capsys.readouterr().err


def test_a_non_finite_checkpoint_is_never_resumed(tmp_path, capsys, reference):
    run = interrupted_run(tmp_path, "run")
    _rewrite_tensors(ckpt.checkpoint_files(run, 6)[1], lambda t: t["method.a.backbone.out.bias"].fill_(float("nan")))
    tensors, err = _finish(tmp_path, "run", capsys)
    notes = [line for line in err.splitlines() if "skipping" in line]
    assert len(notes) == 1
    assert "ckpt-000000006.safetensors: not finite: the weights a.backbone.out.bias holds NaN" in notes[0]
    assert notes[0].endswith("resuming from the older intact checkpoint "
                             f"{run}/checkpoints/ckpt-000000004.json")
    assert same_tensors(tensors, reference)          # resumed from step 4: still the uninterrupted run's bits


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path, capsys, reference):
    run = interrupted_run(tmp_path, "run")
    path = ckpt.checkpoint_files(run, 6)[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                                  # one bit of tensor data: the file still loads
    path.write_bytes(bytes(data))
    assert load_file(path)                            # (safetensors itself does not notice)
    tensors, err = _finish(tmp_path, "run", capsys)
    notes = [line for line in err.splitlines() if "skipping" in line]
    assert len(notes) == 1 and "ckpt-000000006.safetensors: sha256 differs" in notes[0]
    assert same_tensors(tensors, reference)


def test_checkpoint_json_inconsistent_or_beyond_the_run(tmp_path, capsys, reference):
    run = interrupted_run(tmp_path, "run")
    js = ckpt.checkpoint_files(run, 6)[1]
    js.write_text(json.dumps(dict(json.loads(js.read_text()), step=999999)))     # the name says step 6
    tensors, err = _finish(tmp_path, "run", capsys)
    assert "ckpt-000000006.json: records step 999999, its name says another step" in err
    assert same_tensors(tensors, reference)
    # nimg below the step count
    run = interrupted_run(tmp_path, "run2")
    js = ckpt.checkpoint_files(run, 6)[1]
    js.write_text(json.dumps(dict(json.loads(js.read_text()), nimg=3)))
    with pytest.raises(DiffdistillError, match="records 3 images after 6 steps"):
        ckpt.read_checkpoint(js)
    # a whole checkpoint beyond the run's length is refused, not taken as "finished"
    run = interrupted_run(tmp_path, "run3")
    tensors_path, js = ckpt.checkpoint_files(run, 6)
    far_tensors, far_json = ckpt.checkpoint_files(run, 999999)
    tensors_path.rename(far_tensors)
    js.rename(far_json)
    far_json.write_text(json.dumps(dict(json.loads(far_json.read_text()), step=999999, nimg=999999 * 16,
                                        tensors_file=far_tensors.name)))
    with pytest.raises(DiffdistillError, match=r"ckpt-000999999.json: at step 999999, beyond this run's 10 steps"):
        train(Toy(), config(tmp_path, "run3", checkpoint_kimg=0.032, keep_checkpoints=3), Points())


def test_no_intact_checkpoint_is_an_error_and_force_deletes_only_the_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    out = ["--out", run, "--max-steps", "6", "--batch", "16", "--checkpoint-kimg", "0.032", "--no-progress"]
    assert run_cli(capsys, *COMMANDS["di"], *out, "--max-steps", "4")[0] == 0      # checkpoints 4, 2 (2 kept)
    for s, _ in ckpt.list_checkpoints(run):
        path = ckpt.checkpoint_files(run, s)[0]
        path.write_bytes(path.read_bytes()[:-1] + b"\x7f")
    (run / "checkpoints" / "notes.txt").write_text("mine")     # files the project did not write
    (run / "notes.txt").write_text("mine too")
    code, _, err = run_cli(capsys, *COMMANDS["di"], *out, "--resume")
    one_error_line(err, "no intact checkpoint to resume from", "sha256 differs", "--force")
    assert code == 1
    code, _, err = run_cli(capsys, *COMMANDS["di"], *out, "--force")
    assert code == 0, err
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (run / "notes.txt").read_text() == "mine too"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 4]


# --------------------------------------------------------------------------------------------------
# 6. Nothing lost: --force, the lock, links, a full disk


def test_force_never_touches_a_folder_that_is_not_a_run(tmp_path, capsys):
    unet = tmp_path / "unet"                 # a diffusers model folder given as --out
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    other = tmp_path / "other"               # a folder of other files, no config.json
    other.mkdir()
    (other / "x.txt").write_text("x")
    for folder, what in ((unet, "not the config.json of a diffdistill run"), (other, "no config.json")):
        before = tree(folder)
        code, _, err = run_cli(capsys, *COMMANDS["teacher"], "--out", folder, "--force", *TINY)
        assert code == 1
        one_error_line(err, str(folder), what)
        assert tree(folder) == before and not (folder / ".lock").exists()


def test_a_run_directory_is_locked_while_a_run_holds_it(tmp_path, capsys):
    run = tmp_path / "run"
    lock = ckpt.RunLock(run)                  # another run holds RUN
    try:
        code, _, err = run_cli(capsys, *COMMANDS["di"], "--out", run, *TINY)
        assert code == 1
        one_error_line(err, f"{run} is in use by process {os.getpid()}")
        assert not (run / "config.json").exists()
    finally:
        lock.release()
    assert not run.exists()                   # the lock made RUN and nothing else was written: gone again
    assert run_cli(capsys, *COMMANDS["di"], "--out", run, *TINY)[0] == 0    # free again: the run goes ahead
    assert (run / ckpt.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert ckpt.RunLock(run).release() is None       # released at the end of the run


def test_links_inside_a_run_directory_are_never_written_through(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*COMMANDS["di"], "--out", run, "--batch", "16", "--checkpoint-kimg", "0.032", "--no-progress"]
    assert run_cli(capsys, *args, "--max-steps", "2")[0] == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.json").write_text("theirs")
    (victim / "stats.jsonl").write_text("theirs")
    for name, target in (("model", victim), ("stats.jsonl", victim / "stats.jsonl"),
                         ("checkpoints/ckpt-000000099.json", victim / "model.json"), (".lock", victim / "x")):
        path = run / name
        saved = path.with_name(path.name + ".saved")
        if path.exists():
            path.rename(saved)
        path.symlink_to(target)
        code, _, err = run_cli(capsys, *args, "--max-steps", "4", "--resume")
        assert code == 1, name
        one_error_line(err, str(path), "link")
        path.unlink()
        if saved.exists():
            saved.rename(path)
    assert tree(victim) == {"model.json": b"theirs", "stats.jsonl": b"theirs"}
    assert run_cli(capsys, *args, "--max-steps", "4", "--resume")[0] == 0


def test_a_full_disk_while_exporting_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real = io.save_file

    def full(tensors, path, metadata=None):
        if Path(path).parent.name == "model":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", full)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *COMMANDS["di"], "--out", run, *TINY)
    assert code == 1
    line = one_error_line(err, f"cannot write {run}/model/model.safetensors (No space left on device)",
                          f"the previous checkpoint {run}/checkpoints/ckpt-000000003.json is intact")
    assert "Error while serializing" not in line
    assert not list(run.rglob("*.tmp"))
    monkeypatch.setattr(io, "save_file", real)
    assert run_cli(capsys, *COMMANDS["di"], "--out", run, *TINY)[0] == 0      # rerun: resumes and exports
    assert (run / "model" / "model.safetensors").is_file()


def test_a_full_disk_while_appending_stats_is_one_line(tmp_path, monkeypatch):
    from diffdistill.train.stats import StatsWriter

    def full(self, record):
        if record["step"] >= 5:
            raise ENOSPC

    monkeypatch.setattr(StatsWriter, "write", full)
    # stats every 3 steps (0.048 kimg), a checkpoint every 4 (0.064 kimg): the line of step 6 fails
    with pytest.raises(DiffdistillError) as caught:
        train(Toy(), config(tmp_path), Points())
    assert str(caught.value) == (f"cannot write {tmp_path}/run/stats.jsonl (No space left on device); the previous "
                                 f"checkpoint {tmp_path}/run/checkpoints/ckpt-000000004.json is intact")


def test_a_full_disk_in_sample_npz_and_ref_stats_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise ENOSPC

    out = tmp_path / "x.npz"
    monkeypatch.setattr(np, "savez", full)
    code, _, err = run_cli(capsys, "sample", "npz", out, "toy:ring8", "--n", "4", "--steps", "2", "--no-progress")
    assert code == 1
    one_error_line(err, f"cannot write {out} (No space left on device); nothing was left behind")
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"an older reference")
    code, _, err = run_cli(capsys, "ref-stats", "digits", "--features", "digits", "--n", "20", "--out", ref,
                           "--force", "--no-progress")
    assert code == 1
    one_error_line(err, f"cannot write {ref} (No space left on device); the previous ref.npz is intact")
    assert ref.read_bytes() == b"an older reference"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_outputs_are_refused_unless_force(tmp_path, capsys):
    snap = tmp_path / "ring"
    io.save_snapshot(snap, ring8(), {"sampler": "heun", "steps": 2})
    cases = {
        "eval": (tmp_path / "result.json", ["eval", snap, "--ref-data", "toy:ring8", "--n", "64", "--no-progress"]),
        "ref-stats": (tmp_path / "ref.npz", ["ref-stats", "digits", "--features", "digits", "--n", "20",
                                             "--no-progress"]),
        "features": (tmp_path / "clf.safetensors", ["features", "train", "--data", "digits", "--max-n", "40",
                                                    "--epochs", "1"]),
        "sample": (tmp_path / "s.npz", ["sample", "npz", "toy:ring8", "--n", "4", "--steps", "2", "--no-progress"]),
    }
    for name, (out, argv) in cases.items():
        argv = [*argv[:2], out, *argv[2:]] if name == "sample" else [*argv, "--out", out]
        out.write_bytes(b"precious")
        code, _, err = run_cli(capsys, *argv)
        assert code == 1, name
        one_error_line(err, str(out), "already exists", "--force")
        assert out.read_bytes() == b"precious"
        assert run_cli(capsys, *argv, "--force")[0] == 0, name
        assert out.read_bytes() != b"precious"
    # features train writes a .json beside its weights: an existing one is refused too
    clf_json = tmp_path / "clf2.json"
    clf_json.write_text("precious")
    code, _, err = run_cli(capsys, *cases["features"][1], "--out", tmp_path / "clf2.safetensors")
    assert code == 1
    one_error_line(err, str(clf_json), "already exists")
    assert not (tmp_path / "clf2.safetensors").exists()


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    """mkstemp makes 0600 files: atomic writes chmod them to what open() would give under the current umask (read
    when writing, not at import), and reading the umask leaves it as it was."""
    from diffdistill import io

    old = os.umask(0o027)
    try:
        assert io.umask() == 0o027 and io.umask() == 0o027
        io.atomic_write(tmp_path / "f.txt", lambda p: Path(p).write_text("x"))
        assert (os.stat(tmp_path / "f.txt").st_mode & 0o777) == 0o640
    finally:
        os.umask(old)
