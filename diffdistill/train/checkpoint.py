"""Training checkpoints and run directories: data, never code.

A checkpoint is two files in RUN/checkpoints/: `ckpt-<step>.safetensors` (every tensor: the method's state dict,
the EMA, optimiser state tensors under flat names) and `ckpt-<step>.json` (step, nimg, RNG states as lists,
optimiser non-tensor state, `method.extra_state()`, the config). Both are written atomically (temp file, fsync,
rename) and the JSON is written last: a checkpoint without its JSON, or whose tensors do not read back whole,
is skipped by `load_latest` with a warning. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import DiffdistillError
from ..io import atomic_write, atomic_write_json

CHECKPOINT_DIR = "checkpoints"
FORMAT = "diffdistill-checkpoint-v1"
# Test hook: "kill-after-tensors:STEP" or "kill-mid-tensors:STEP" SIGKILLs this process while it writes the
# checkpoint of that step (after the tensors file, before its JSON; or half-way through the tensors file).
TEST_HOOK_ENV = "DIFFDISTILL_TEST_CHECKPOINT_HOOK"


def _hook(stage: str, step: int) -> bool:
    spec = os.environ.get(TEST_HOOK_ENV, "")
    return spec == f"{stage}:{step}"


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


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` (tensors, then the JSON that marks it complete); keep the newest `keep`.

    An OSError (e.g. ENOSPC) propagates and leaves every earlier checkpoint untouched.
    """
    tensors_path, json_path = checkpoint_files(run_dir, step)
    tensors = _unshared(tensors)

    def write_tensors(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        if _hook("kill-mid-tensors", step):  # simulate a crash half-way through the write
            size = tmp.stat().st_size
            with open(tmp, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(tensors_path, write_tensors)
    if _hook("kill-after-tensors", step):
        os.kill(os.getpid(), signal.SIGKILL)
    state = dict(state, format=FORMAT, step=step, tensors_file=tensors_path.name,
                 tensors_bytes=tensors_path.stat().st_size)
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


def read_checkpoint(json_path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of one checkpoint; DiffdistillError naming the file if it is not whole."""
    json_path = Path(json_path)
    try:
        state = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffdistillError(f"{json_path}: unreadable checkpoint JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DiffdistillError(f"{json_path}: not a {FORMAT} file")
    tensors_path = json_path.parent / str(state.get("tensors_file", ""))
    if not tensors_path.is_file():
        raise DiffdistillError(f"{tensors_path}: checkpoint tensors are missing")
    if tensors_path.stat().st_size != state.get("tensors_bytes"):
        raise DiffdistillError(f"{tensors_path}: has {tensors_path.stat().st_size} bytes, the checkpoint "
                               f"recorded {state.get('tensors_bytes')} (damaged)")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors raises several types on damaged files
        raise DiffdistillError(f"{tensors_path}: damaged checkpoint tensors ({e})") from None
    return tensors, state


def load_latest(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that reads back whole (damaged ones are skipped with a warning), or None."""
    for _step, js in list_checkpoints(run_dir):
        try:
            return read_checkpoint(js)
        except DiffdistillError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
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


def prepare_run_dir(run_dir: str | Path, config: dict, command: str, resume: bool, force: bool) -> bool:
    """Create or check RUN. Returns True when training should resume from RUN's newest checkpoint.

    A run dir records `config.json` and `command.txt`. Rerunning the same config resumes; a different one is
    refused unless `resume` (continue it with the new settings) or `force` (start over: its checkpoints and
    stats are deleted).
    """
    run_dir = Path(run_dir)
    config = json.loads(json.dumps(config))  # normalise tuples etc. to their JSON form
    cfg_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise DiffdistillError(f"{run_dir}: exists and is not a directory")
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    resuming = False
    if not fresh:
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                old = None
            same = isinstance(old, dict) and not _differences(old, config)
            if force:
                shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
                (run_dir / "stats.jsonl").unlink(missing_ok=True)
            elif same or resume:
                resuming = True
            else:
                diff = _differences(old, config) if isinstance(old, dict) else ["config.json (unreadable)"]
                raise DiffdistillError(f"{run_dir}: holds a different run (differs in {', '.join(diff[:5])}); "
                                       "pass --resume to continue it with these settings or --force to start over")
        elif not force:
            raise DiffdistillError(f"{run_dir}: is not empty and holds no diffdistill run (no config.json); "
                                   "choose another --out or pass --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, config)
    line = command.rstrip("\n") + "\n"
    if resuming and (run_dir / "command.txt").is_file():
        line = (run_dir / "command.txt").read_text() + line
    atomic_write(run_dir / "command.txt", lambda p: p.write_text(line))
    return resuming
