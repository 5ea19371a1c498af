"""Training checkpoints and run directories: data, never code.

A checkpoint is two files in RUN/checkpoints/: `ckpt-<step>.safetensors` (every tensor: the method's state dict,
the EMA, optimiser state tensors under flat names) and `ckpt-<step>.json` (step, nimg, RNG states as lists,
optimiser non-tensor state, the config, the size and sha256 of the tensors file). Both
are written atomically (temp file, fsync, rename) and the JSON is written last. Only finite state is written: a
NaN or inf anywhere (weights, EMA, optimiser state) is refused before anything is written or pruned, so the
checkpoints on disk are always the last finite ones. A checkpoint without its JSON, whose JSON disagrees with
its name, whose tensors do not match the recorded size and sha256, or that holds a non-finite value is skipped by
`load_latest`, which says so and falls back to the newest intact one. Nothing is ever unpickled.

A run directory is locked (`RunLock`, fcntl.flock on RUN/.lock) while a run holds it, holds no symbolic links
(`check_no_links`), and `--force` starts over only a directory whose config.json is a run of this project,
deleting only the run's own checkpoints and stats.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import DiffdistillError
from ..io import atomic_write, atomic_write_json

CHECKPOINT_DIR = "checkpoints"
FORMAT = "diffdistill-checkpoint-v1"
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------------------------------
# Flattening optimiser state into tensors + JSON


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `opt.state_dict()` into tensors named '<prefix>.<param index>.<key>' and a JSON-able rest."""
    sd = opt.state_dict()
    tensors, state_json = {}, {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                state_json.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state_json}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict,
                        prefix: str) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, entries in info.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = []
    for g in info["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict:
    """Torch RNG states as JSON lists (the loop reseeds every step; these are kept for completeness)."""
    out = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    if "cpu" in state:
        torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------------
# Writing and reading checkpoints


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v.contiguous()
    return out


def nonfinite(tensors: dict[str, torch.Tensor], buffers=()) -> list[tuple[str, str]]:
    """(name, 'NaN' or 'inf') of every floating-point tensor holding a NaN or an infinity, in order. The tensors
    named in `buffers` (module buffers, not weights) may hold inf, a legitimate sentinel (e.g. KD's best held-out
    loss so far starts at inf); a NaN counts everywhere."""
    bad = []
    for name, v in tensors.items():
        if not (torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())):
            continue
        if name in buffers:
            if bool(torch.isnan(v).any()):
                bad.append((name, "NaN"))
        elif not bool(torch.isfinite(v).all()):
            bad.append((name, "NaN" if bool(torch.isnan(v).any()) else "inf"))
    return bad


def buffer_names(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """Names (with `prefix`) of the state-dict entries of `module` that are buffers, not parameters."""
    return {prefix + k for k, v in module.state_dict(keep_vars=True).items() if not isinstance(v, torch.nn.Parameter)}


def describe_tensor(name: str) -> str:
    """Where a checkpoint tensor comes from, in words: 'optim.gen.3.exp_avg_sq' -> "the optimiser state of group
    'gen' (optim.gen.3.exp_avg_sq)"."""
    kind, _, rest = name.partition(".")
    if kind == "optim":
        return f"the optimiser state of group {rest.split('.', 1)[0]!r} ({name})"
    if kind == "ema":
        return f"the EMA weights ({name})"
    if kind == "method":
        return f"the weights {rest}"
    return name


class NonFiniteState(DiffdistillError):
    """The training state holds a NaN or inf: nothing was written (`bad`: `nonfinite`'s list)."""

    def __init__(self, bad: list[tuple[str, str]]):
        name, kind = bad[0]
        more = f" and {len(bad) - 1} more tensor{'s' * (len(bad) > 2)}" if len(bad) > 1 else ""
        super().__init__(f"{describe_tensor(name)} holds {kind}{more}")
        self.bad = bad


def checkpoint_files(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    base = Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:09d}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, json path) of every checkpoint that has its JSON, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = []
    for p in folder.glob("ckpt-*.json") if folder.is_dir() else []:
        try:
            found.append((int(p.stem.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(found, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 2, buffers=(), checked: bool = False) -> Path:
    """Write checkpoint `step` (tensors, then the JSON that marks it complete); keep the newest `keep`.

    A non-finite tensor (`nonfinite`; `buffers` names the buffers, which may hold inf) raises `NonFiniteState`
    before anything is written (older checkpoints stay, none is pruned; `checked`: the caller did that check).
    A write that fails (disk full: OSError, SafetensorError; both raise io.CannotWrite) leaves every earlier
    checkpoint untouched.
    """
    bad = [] if checked else nonfinite(tensors, buffers)
    if bad:
        raise NonFiniteState(bad)
    inf_buffers = sorted(n for n in buffers if n in tensors and tensors[n].is_floating_point()
                         and bool(torch.isinf(tensors[n]).any()))
    tensors_path, json_path = checkpoint_files(run_dir, step)
    tensors = _unshared(tensors)
    digest = {}

    def write_tensors(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        digest["sha256"] = _sha256(tmp)     # of the bytes as written, read back

    atomic_write(tensors_path, write_tensors)
    state = dict(state, format=FORMAT, step=step, tensors_file=tensors_path.name,
                 tensors_bytes=tensors_path.stat().st_size, tensors_sha256=digest["sha256"], inf_buffers=inf_buffers)
    atomic_write_json(json_path, state)
    _prune(run_dir, keep)
    return json_path


def _prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, orphan tensor files and stale temp files."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    complete = list_checkpoints(run_dir)
    keep_steps = {s for s, _ in complete[:max(keep, 1)]}
    newest = complete[0][0] if complete else -1
    for _step, js in complete[max(keep, 1):]:
        js.unlink(missing_ok=True)
    for p in folder.glob("ckpt-*.safetensors"):
        try:
            s = int(p.stem.split("-", 1)[1])
        except ValueError:
            continue
        if s not in keep_steps and s <= newest:
            p.unlink(missing_ok=True)
    for p in folder.glob(".ckpt-*.tmp"):
        p.unlink(missing_ok=True)


def _whole_int(state: dict, key: str, json_path: Path) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DiffdistillError(f"{json_path}: {key} must be a non-negative whole number, got {value!r} (damaged)")
    return value


def read_checkpoint(json_path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of one checkpoint; a one-line DiffdistillError naming the file if it is not whole: a JSON
    that is not a checkpoint's or disagrees with its file name (step, tensors file), nimg below step, tensors of
    another size or sha256 than recorded, unreadable tensors, or a NaN/inf in them."""
    json_path = Path(json_path)
    try:
        state = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DiffdistillError(f"{json_path}: unreadable checkpoint JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DiffdistillError(f"{json_path}: not a {FORMAT} file")
    step, nimg = _whole_int(state, "step", json_path), _whole_int(state, "nimg", json_path)
    expected_tensors, expected_json = checkpoint_files(json_path.parent.parent, step)
    if json_path.name != expected_json.name:
        raise DiffdistillError(f"{json_path}: records step {step}, its name says another step (damaged)")
    if nimg < step:
        raise DiffdistillError(f"{json_path}: records {nimg} images after {step} steps (every step trains on at "
                               "least one; damaged)")
    if state.get("tensors_file") != expected_tensors.name:
        raise DiffdistillError(f"{json_path}: tensors_file is {state.get('tensors_file')!r}, expected "
                               f"{expected_tensors.name!r} (damaged)")
    tensors_path = json_path.parent / expected_tensors.name
    if not tensors_path.is_file():
        raise DiffdistillError(f"{tensors_path}: checkpoint tensors are missing")
    if tensors_path.stat().st_size != state.get("tensors_bytes"):
        raise DiffdistillError(f"{tensors_path}: has {tensors_path.stat().st_size} bytes, the checkpoint "
                               f"recorded {state.get('tensors_bytes')} (damaged)")
    recorded = state.get("tensors_sha256")
    if recorded is not None and recorded != _sha256(tensors_path):    # older checkpoints have no checksum
        raise DiffdistillError(f"{tensors_path}: sha256 differs from the one its checkpoint recorded (damaged)")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors raises several types on damaged files
        raise DiffdistillError(f"{tensors_path}: damaged checkpoint tensors ({str(e).splitlines()[0]})") from None
    inf_buffers = state.get("inf_buffers", [])
    if not isinstance(inf_buffers, list) or not all(isinstance(n, str) for n in inf_buffers):
        raise DiffdistillError(f"{json_path}: inf_buffers must be a list of tensor names (damaged)")
    bad = nonfinite(tensors, set(inf_buffers))
    if bad:
        raise DiffdistillError(f"{tensors_path}: not finite: {NonFiniteState(bad)}")
    return tensors, state


def load_latest(run_dir: str | Path, say=None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that reads back whole and finite, or None when the run has no checkpoint.

    Each damaged or non-finite newer one is skipped with a line through `say` (default: a warning) saying that an
    older one is used; when checkpoints exist but none is intact, a one-line DiffdistillError (resuming from step
    0 would silently discard the run)."""
    if say is None:
        def say(text):
            warnings.warn(text, stacklevel=3)
    skipped = []
    for _step, js in list_checkpoints(run_dir):
        try:
            loaded = read_checkpoint(js)
        except DiffdistillError as e:
            skipped.append(str(e))
            continue
        for text in skipped:
            say(f"skipping damaged checkpoint: {text}; resuming from the older intact checkpoint {js}")
        return loaded
    if skipped:
        more = f" (and {len(skipped) - 1} older, also damaged)" if len(skipped) > 1 else ""
        raise DiffdistillError(f"{run_dir}: no intact checkpoint to resume from: {skipped[0]}{more}; pass --force "
                               "to start over")
    return None


# --------------------------------------------------------------------------------------------------
# Run directories


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _is_temp(name: str) -> bool:
    """A temp file of `io.atomic_write` (left behind by a process killed while writing)."""
    return name.startswith(".") and name.endswith(".tmp")


def is_run_config(obj) -> bool:
    """Whether a parsed config.json is the record of a run of this project (`loop.run_config`)."""
    return isinstance(obj, dict) and isinstance(obj.get("method"), str) and isinstance(obj.get("train"), dict) \
        and "meta" in obj


def check_no_links(run_dir: str | Path) -> None:
    """Refuse a run directory holding a symbolic link anywhere inside (RUN itself may be one): the run writes its
    checkpoints, snapshots and stats there and never through a link to somewhere else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink():
                raise DiffdistillError(f"{p}: a symbolic link inside the run directory {run_dir}; diffdistill does "
                                       "not write through links (remove it, or choose another --out)")


def _start_over(run_dir: Path) -> None:
    """--force: delete the run's own checkpoints and stats, nothing else (a foreign file stays where it is)."""
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            own = (p.name.startswith("ckpt-") and p.suffix in (".json", ".safetensors")) or \
                (p.name.startswith(".ckpt-") and p.suffix == ".tmp")
            if own and p.is_file():
                p.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:      # it holds something that is not ours: leave it
            pass
    (run_dir / "stats.jsonl").unlink(missing_ok=True)


def prepare_run_dir(run_dir: str | Path, config: dict, command: str, resume: bool, force: bool) -> bool:
    """Create or check RUN. Returns True when training should resume from RUN's newest checkpoint.

    A run dir records `config.json` and `command.txt`. Rerunning the same config resumes; a different one is
    refused unless `resume` (continue it with the new settings) or `force` (start over: its checkpoints and
    stats are deleted). A directory that is not a run of this project (no config.json, or one that is not a run's
    record: e.g. a diffusers model folder) is refused even with `force`: nothing the project did not write is
    ever deleted or rewritten.
    """
    run_dir = Path(run_dir)
    config = json.loads(json.dumps(config))  # normalise tuples etc. to their JSON form
    cfg_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise DiffdistillError(f"{run_dir}: exists and is not a directory")
    check_no_links(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE and not _is_temp(p.name)] \
        if run_dir.exists() else []
    resuming = False
    if entries:
        if not cfg_path.is_file():
            raise DiffdistillError(f"{run_dir}: is not empty and holds no diffdistill run (no config.json); choose "
                                   "another --out (--force only starts over a run of this project)")
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            old = None
        if not is_run_config(old):
            raise DiffdistillError(f"{cfg_path}: not the config.json of a diffdistill run, so {run_dir} is not a run "
                                   "of this project; choose another --out (--force only starts over a run of this "
                                   "project, it never deletes or rewrites other files)")
        same = not _differences(old, config)
        if force:
            _start_over(run_dir)
        elif same or resume:
            resuming = True
        else:
            diff = _differences(old, config)
            raise DiffdistillError(f"{run_dir}: holds a different run (differs in {', '.join(diff[:5])}); "
                                   "pass --resume to continue it with these settings or --force to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, config)
    line = command.rstrip("\n") + "\n"
    if resuming and (run_dir / "command.txt").is_file():
        line = (run_dir / "command.txt").read_text(errors="replace") + line
    atomic_write(run_dir / "command.txt", lambda p: p.write_text(line))
    return resuming


# --------------------------------------------------------------------------------------------------
# The run lock


class RunLock:
    """An exclusive lock on RUN while a run holds it: fcntl.flock on RUN/.lock, which records the holder's pid.

    A second run of the same RUN gets the one-line "RUN is in use by process PID". The kernel releases the lock
    when the process dies (SIGKILL included), so a killed run never leaves RUN locked. Creates RUN when missing;
    `release` removes the lock file again when RUN did not become a run (a refused --out keeps only what it held)
    and RUN itself when this lock created it and nothing else was written."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd = None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise DiffdistillError(f"{self.run_dir}: exists and is not a directory")
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:         # no flock on this platform: no lock
            return
        path = self.run_dir / LOCK_FILE
        self.new_file = not (path.exists() or path.is_symlink())
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NONBLOCK", 0), 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DiffdistillError(f"{path}: a symbolic link inside the run directory {self.run_dir}; "
                                       "diffdistill does not write through links (remove it)") from None
            raise DiffdistillError(f"{path}: cannot open the run's lock file ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DiffdistillError(f"{path}: not a regular file (the run's lock file; remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DiffdistillError(f"{self.run_dir} is in use by process {holder or '(unknown)'}: another run "
                                       "holds it; wait for it to finish or choose another --out") from None
            # a file system without locks (some network file systems): run unlocked, saying so
            warnings.warn(f"{path}: this file system cannot lock the run directory ({e.strerror or e}); two runs "
                          "on it at once would mix their checkpoints", stacklevel=2)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            config = None
        if self.new_file and not is_run_config(config):     # no run started here: take the lock file away again
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            if self.created:
                try:
                    self.run_dir.rmdir()                      # only when empty
                except OSError:
                    pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
