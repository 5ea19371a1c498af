"""diffusers checkpoints (a `UNet2DModel` plus a DDPM/DDIM scheduler config) as EDM-space denoisers.

A model directory is either a pipeline folder (`unet/config.json` + weights, `scheduler/scheduler_config.json`)
or a bare model folder (`config.json` with `_class_name: UNet2DModel` + weights, `scheduler_config.json`).
Nothing is unpickled: the architecture is built from its JSON config, weights are read from safetensors
(a `.bin` only through `torch.load(weights_only=True)`) and checked tensor by tensor against the config.
diffusers itself is an optional dependency, imported only here.

The scheduler config supplies the discrete schedule abar_t and the prediction type; the timestep <-> sigma
mapping is `sigma_t = sqrt((1 - abar_t) / abar_t)` (see `teachers.discrete`). Clipping of the predicted x0
(`clip_sample`, `clip_sample_range`) is a sampler option of diffusers, not part of the model: `ddim_recipe` turns
it into the euler sampler's clip_denoised (+ clip_keeps_eps, diffusers' DDIM default), and `thresholding`
(`dynamic_thresholding_ratio`, `sample_max_value`) into its dynamic_threshold / threshold_max, which a converted
snapshot records. The DDPM sampler's noise follows `variance_type`
(`ddpm_variance`: fixed_small / fixed_large; learned ones are refused by `samplers.sample_ddpm`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ..diffusion.schedules import ddpm_alphas_cumprod
from ..errors import DiffdistillError
from ..guard import check_alloc, check_finite, lexists, read_bytes, regular_file
from ..io import BuildErrors, load_state_strict, load_tensors, save_snapshot
from ..schema import DIFFUSERS_SCHEDULER, DIFFUSERS_UNET, SHARD_INDEX, check, load_json, parse_json
from .discrete import PREDICTIONS, DiscreteVPDenoiser, ddim_timesteps, discrete_sigmas_for

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import UNet2DModel
    except ImportError:
        raise DiffdistillError("reading a diffusers model needs the optional dependency diffusers: "
                               "pip install diffusers") from None
    return UNet2DModel


# --------------------------------------------------------------------------------------------------
# Scheduler config


@dataclass
class SchedulerConfig:
    """The parts of a diffusers DDPM/DDIM scheduler config that define the teacher (defaults = diffusers')."""

    class_name: str = "DDPMScheduler"     # DDPMScheduler | DDIMScheduler
    num_train_timesteps: int = 1000       # T: timesteps 0..T-1
    beta_start: float = 1e-4              # first beta of the linear / scaled_linear schedule
    beta_end: float = 0.02                # last beta
    beta_schedule: str = "linear"         # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: list | None = None     # explicit betas (override beta_schedule)
    prediction_type: str = "epsilon"      # what the UNet predicts: epsilon | v_prediction | sample
    timestep_spacing: str = "leading"     # inference timesteps: leading | trailing | linspace
    steps_offset: int = 0                 # added to 'leading' timesteps
    set_alpha_to_one: bool = True         # DDIM: the last step goes to abar = 1 (sigma 0) rather than abar_0
    variance_type: str = "fixed_small"    # DDPM: fixed_small | fixed_large | learned | learned_range ...
    clip_sample: bool = True              # diffusers clips x0 to [-r, r] while sampling (`ddim_recipe`)
    clip_sample_range: float = 1.0        # r
    thresholding: bool = False            # dynamic thresholding of x0 instead (`samplers.ode.x0_clipper`)
    dynamic_thresholding_ratio: float = 0.995   # its quantile of |x0|
    sample_max_value: float = 1.0         # its largest threshold

    @classmethod
    def from_json(cls, path: Path) -> SchedulerConfig:
        raw = load_json(path, what="scheduler config")
        if not isinstance(raw, dict):
            raise DiffdistillError(f"{path}: a scheduler config must be a JSON object")
        name = raw.get("_class_name")
        if name not in SCHEDULERS:
            raise DiffdistillError(f"{path}: unsupported scheduler {name!r} (supported: {', '.join(SCHEDULERS)})")
        if raw.get("rescale_betas_zero_snr"):
            raise DiffdistillError(f"{path}: rescale_betas_zero_snr gives abar = 0 at the last timestep, an "
                                   "infinite EDM sigma; such teachers are not supported")
        check(raw, DIFFUSERS_SCHEDULER, path, "scheduler config")   # types and ranges of every field used
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        cfg = cls(class_name=name, **kwargs)
        cfg.validate(path)
        return cfg

    def validate(self, where) -> None:
        if self.prediction_type not in PREDICTIONS:
            raise DiffdistillError(f"{where}: unknown prediction type {self.prediction_type!r} "
                                   f"(supported: {', '.join(PREDICTIONS)})")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise DiffdistillError(f"{where}: unknown beta schedule {self.beta_schedule!r} "
                                   f"(supported: {', '.join(BETA_SCHEDULES)})")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise DiffdistillError(f"{where}: unknown timestep spacing {self.timestep_spacing!r}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise DiffdistillError(f"{where}: num_train_timesteps must be an integer >= 2")
        if self.clip_sample and not self.thresholding and not 0 < float(self.clip_sample_range) < math.inf:
            raise DiffdistillError(f"{where}: clip_sample_range must be a positive number, got "
                                   f"{self.clip_sample_range!r}")
        if self.thresholding and not (0 < float(self.dynamic_thresholding_ratio) <= 1
                                      and 1 <= float(self.sample_max_value) < math.inf):
            raise DiffdistillError(f"{where}: thresholding needs dynamic_thresholding_ratio in (0, 1] and "
                                   f"sample_max_value >= 1, got {self.dynamic_thresholding_ratio!r}, "
                                   f"{self.sample_max_value!r}")

    def alphas_cumprod(self) -> Tensor:
        """abar_t, t = 0..T-1 (float64), from the betas of the config."""
        if self.trained_betas is not None:
            betas = torch.as_tensor(self.trained_betas, dtype=torch.float64).reshape(-1)
            return torch.cumprod(1 - betas, dim=0)
        return ddpm_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)


# --------------------------------------------------------------------------------------------------
# Finding and reading a model directory


def find_diffusers_model(path) -> tuple[Path, Path] | None:
    """(UNet folder, scheduler config file) of a diffusers model directory, or None if `path` is not one."""
    path = Path(path)
    if not path.is_dir():
        return None
    for unet_dir, sched in ((path / "unet", path / "scheduler" / "scheduler_config.json"),
                            (path, path / "scheduler_config.json"),
                            (path, path / "scheduler" / "scheduler_config.json")):
        cfg = unet_dir / "config.json"
        if cfg.is_file() and sched.is_file():
            try:
                name = parse_json(read_bytes(cfg, "model config"), cfg).get("_class_name")
            except (DiffdistillError, AttributeError):
                name = None
            if unet_dir != path or name == "UNet2DModel":
                return unet_dir, sched
    return None


def _read_unet_config(path: Path) -> dict:
    cfg = load_json(path, what="model config")
    if not isinstance(cfg, dict):
        raise DiffdistillError(f"{path}: a model config must be a JSON object")
    if cfg.get("_class_name") != "UNet2DModel":
        raise DiffdistillError(f"{path}: model class {cfg.get('_class_name')!r} is not supported (only UNet2DModel)")
    return check(cfg, DIFFUSERS_UNET, path, "model config")


def _load_bin(path: Path) -> dict[str, Tensor]:
    regular_file(path, "weights file")   # torch.load would block on a FIFO
    try:
        with warnings.catch_warnings():   # torch warns (several lines) about odd protocols of damaged files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # truncated zip, pickle with code, ...: all mean "unreadable"
        raise DiffdistillError(f"{path}: not a readable weights-only torch file ({type(e).__name__}: {e})"
                               .split("\n")[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DiffdistillError(f"{path}: expected a dict of tensors")
    return state


def _read_weights(unet_dir: Path) -> tuple[dict[str, Tensor], Path]:
    """State dict of a diffusers model folder: safetensors first, then weights-only .bin; shards via index."""
    for name in WEIGHT_FILES:
        path = unet_dir / name
        if not lexists(path):   # a weights file that is a FIFO, a directory or a dangling link: an error
            continue
        read = load_tensors if ".safetensors" in name else _load_bin
        if not name.endswith(".index.json"):
            return read(path), path
        index = load_json(path, SHARD_INDEX, "shard index")
        shards = sorted(set(index["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise DiffdistillError(f"{path}: shard name {shard!r} must be a plain file name")
            state.update(read(unet_dir / shard))
        return state, path
    raise DiffdistillError(f"{unet_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _build_unet(cfg: dict, where, meta: bool = False):
    """A UNet2DModel of `cfg`; `meta`: on the meta device (shapes only, nothing allocated)."""
    UNet2DModel = _require_diffusers()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        with warnings.catch_warnings():   # diffusers warns about unknown keys (several lines on stderr)
            warnings.simplefilter("ignore")
            if meta:
                with torch.device("meta"):
                    return UNet2DModel.from_config(cfg)
            return UNet2DModel.from_config(cfg)
    except Exception as e:  # diffusers raises assorted errors for bad block types / channel counts
        raise DiffdistillError(f"{where}: cannot build a UNet2DModel from this config ({type(e).__name__}: {e})"
                               .split("\n")[0]) from None


def _check_unet_weights(cfg: dict, cfg_path: Path, state: dict[str, Tensor], weights_path: Path) -> None:
    """Before the UNet is built for real: its size against the machine's memory, and the weights' names and
    shapes against its meta-device twin (a config of a huge UNet with small weights allocates nothing)."""
    meta = _build_unet(cfg, cfg_path, meta=True)
    check_alloc(sum(p.numel() * p.element_size() for p in meta.parameters()), cfg_path, "the UNet of this config")
    expected = meta.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DiffdistillError(f"{weights_path}: weights do not match the config {cfg_path} (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DiffdistillError(f"{weights_path}: tensor {k} has shape {tuple(v.shape)}, the config needs "
                                   f"{tuple(expected[k].shape)} ({cfg_path})")
    check_finite(state, weights_path)


# --------------------------------------------------------------------------------------------------
# The denoiser


class DiffusersDenoiser(DiscreteVPDenoiser):
    """A diffusers UNet2DModel on its scheduler's discrete timesteps, as D(x, sigma, cond) in EDM space.

    Class-conditional UNets (`num_class_embeds`) take one-hot rows; an all-zero row (unconditional) is sent as
    class index `null_class` (the label the model was trained with for "no class"), and is an error without one.
    With a null class, label_dim = num_class_embeds - 1 and the other indices are the labels in order.
    """

    def __init__(self, unet, scheduler: SchedulerConfig, timestep_rule: str = "nearest",
                 null_class: int | None = None, path: str | None = None):
        ucfg = unet.config
        size = ucfg.sample_size
        if size is None:
            raise DiffdistillError(f"{path or 'UNet2DModel'}: the config has no sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (ucfg.in_channels, h, w)
        learned = scheduler.variance_type in ("learned", "learned_range")
        if ucfg.out_channels != ucfg.in_channels * (2 if learned else 1):
            raise DiffdistillError(f"{path or 'UNet2DModel'}: out_channels={ucfg.out_channels} does not fit "
                                   f"in_channels={ucfg.in_channels} with variance_type={scheduler.variance_type!r}")
        label_dim = 0
        if unet.class_embedding is not None:
            if ucfg.class_embed_type is not None or not ucfg.num_class_embeds:
                raise DiffdistillError(f"{path or 'UNet2DModel'}: class_embed_type={ucfg.class_embed_type!r} "
                                       "is not supported (only num_class_embeds class labels)")
            label_dim = ucfg.num_class_embeds - (null_class is not None)
            if null_class is not None and not 0 <= null_class < ucfg.num_class_embeds:
                raise DiffdistillError(f"null_class {null_class} outside 0..{ucfg.num_class_embeds - 1}")
        elif null_class is not None:
            raise DiffdistillError("null_class given for an unconditional UNet")
        super().__init__(unet, shape, scheduler.alphas_cumprod(), scheduler.prediction_type, timestep_rule,
                         label_dim)
        self.scheduler = scheduler
        self.null_class = null_class
        self.path = path
        self._split_variance = learned

    def run_model(self, z: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        labels = None
        if self.model.class_embedding is not None:
            labels = self._labels(cond, z.shape[0], z.device)
        out = self.model(z.to(dtype), t.to(device=z.device, dtype=torch.float32), class_labels=labels).sample
        if self._split_variance:  # learned variance: [eps or v or x0, variance] along channels
            out = out[:, : self.shape[0]]
        return out

    def _labels(self, cond: Tensor | None, batch: int, device) -> Tensor:
        if cond is None:
            cond = torch.zeros(batch, self.label_dim, device=device)
        if not bool(((cond == 0) | (cond == 1)).all()) or bool((cond.sum(1) > 1).any()):
            raise ValueError("a diffusers class embedding takes one-hot (or all-zero) label rows only")
        idx = cond.argmax(1)
        uncond = cond.sum(1) == 0
        if self.null_class is None:
            if bool(uncond.any()):
                raise DiffdistillError("this diffusers UNet has no unconditional class: give null_class "
                                       "(the index it was trained with for 'no label') to use zero labels")
            return idx
        idx = idx + (idx >= self.null_class).long()          # labels skip the null index
        return torch.where(uncond, torch.full_like(idx, self.null_class), idx)

    @property
    def ddpm_variance(self) -> str:
        """The scheduler's variance_type: the noise `samplers.sample_ddpm` draws for this teacher."""
        return self.scheduler.variance_type

    def ddim_recipe(self, steps: int) -> dict:
        """diffusers' DDIMPipeline as a sampling recipe: deterministic DDIM (euler) on the scheduler's own
        `steps` timesteps, treating x0 as the scheduler does (thresholding, else clip_sample to
        [-clip_sample_range, clip_sample_range]) with the direction from the unclipped eps (DDIMScheduler.step's
        default use_clipped_model_output=False). `samplers.sample` starts it from the VP prior, so with the same
        unit noise it reproduces DDIMPipeline(eta=0)."""
        s = self.scheduler
        recipe = dict(sampler="euler", sigmas=self.default_sigmas(steps).tolist())
        if s.thresholding:
            recipe.update(dynamic_threshold=float(s.dynamic_thresholding_ratio),
                          threshold_max=float(s.sample_max_value), clip_keeps_eps=True)
        elif s.clip_sample:
            r = float(s.clip_sample_range)
            recipe.update(clip_denoised=True if r == 1.0 else r, clip_keeps_eps=True)
        return recipe

    def default_sigmas(self, steps: int) -> Tensor:
        """The scheduler's own `steps`-step timesteps (its spacing and offset) as an EDM grid ending in 0."""
        s = self.scheduler
        ts = ddim_timesteps(steps, s.timestep_spacing, s.num_train_timesteps, s.steps_offset)
        return discrete_sigmas_for(self, ts, s.set_alpha_to_one if s.class_name == "DDIMScheduler" else True)

    def config(self) -> dict:
        unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.model.config).items()
                    if not k.startswith("_")}
        return dict(type="diffusers", path=self.path, unet=unet_cfg, scheduler=asdict(self.scheduler),
                    timestep_rule=self.timestep_rule, null_class=self.null_class)


def load_diffusers(path, device="cpu", timestep_rule: str = "nearest", null_class: int | None = None
                   ) -> DiffusersDenoiser:
    """A diffusers model directory as a DiffusersDenoiser (eval mode, float32, no grad)."""
    path = Path(path)
    found = find_diffusers_model(path)
    if found is None:
        raise DiffdistillError(f"{path}: not a diffusers model directory (looked for unet/config.json + "
                               "scheduler/scheduler_config.json, or config.json with _class_name UNet2DModel + "
                               "scheduler_config.json)")
    unet_dir, sched_path = found
    scheduler = SchedulerConfig.from_json(sched_path)
    unet_cfg_path = unet_dir / "config.json"
    unet_cfg = _read_unet_config(unet_cfg_path)
    state, weights_path = _read_weights(unet_dir)
    _check_unet_weights(unet_cfg, unet_cfg_path, state, weights_path)   # before anything is allocated
    unet = _build_unet(unet_cfg, unet_cfg_path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(unet, state, f"{weights_path} (config {unet_cfg_path})")
    with BuildErrors(path):
        den = DiffusersDenoiser(unet.float(), scheduler, timestep_rule, null_class, str(path.resolve()))
    den.source = str(path)   # named by errors of what it produces (samplers.iter_samples)
    return den.to(device).eval().requires_grad_(False)


def build_diffusers(config: dict) -> DiffusersDenoiser:
    """Random-weight architecture from an embedded UNet config; or, with only `path`, the model read from it."""
    if "unet" not in config:
        if not config.get("path"):
            raise DiffdistillError("a 'diffusers' denoiser config needs 'unet' (+ 'scheduler') or 'path'")
        return load_diffusers(config["path"], timestep_rule=config.get("timestep_rule", "nearest"),
                              null_class=config.get("null_class"))
    try:
        scheduler = SchedulerConfig(**config["scheduler"])
    except (KeyError, TypeError) as e:
        raise DiffdistillError(f"malformed 'diffusers' denoiser config: scheduler ({e})") from None
    scheduler.validate("'diffusers' denoiser config")
    unet = _build_unet(config["unet"], "'diffusers' denoiser config")
    return DiffusersDenoiser(unet, scheduler, config.get("timestep_rule", "nearest"), config.get("null_class"),
                             config.get("path"))


def snapshot_from_diffusers(model_dir, out_dir, steps: int = 50, timestep_rule: str = "nearest",
                            null_class: int | None = None) -> Path:
    """Convert a diffusers model directory to a diffdistill snapshot (weights + JSON); nothing is written on error.

    The sampling recipe is diffusers' DDIMPipeline (`DiffusersDenoiser.ddim_recipe`): deterministic DDIM on the
    scheduler's own `steps` timesteps, with its x0 clipping.
    """
    den = load_diffusers(model_dir, "cpu", timestep_rule, null_class)
    sampling = den.ddim_recipe(steps)
    meta = dict(source=str(Path(model_dir).resolve()), format="diffusers", scheduler=den.scheduler.class_name)
    return save_snapshot(out_dir, den, sampling, meta)
