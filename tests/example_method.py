"""A complete small method, as a new one is added (docs/architecture.md, "Adding a method"): this file and one
`diffdistill.methods.register("example", "tests.example_method")` line (a built-in method adds its line to
`methods.REGISTRY` instead). Nothing else changes: the command line `diffdistill distill example`, the Python API
`diffdistill.distill("example", ...)` and the training loop pick it up.

The method: a one-step student at a fixed level sigma regresses the teacher's denoiser at that level,
S(sigma z; sigma) ~ D(sigma z; sigma) (one term of KD's objective, without the ODE), enough to show the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from diffdistill.methods import MethodSpec, common
from diffdistill.methods.base import Batch, Group, Method, OptimConfig
from diffdistill.methods.options import MethodConfig, option


@dataclass
class ExampleConfig(MethodConfig):
    lr: float = option(1e-3, "Adam learning rate of the student (default %(default)s)")
    sigma: float | None = option(None, "the student's noise level (default: the teacher's sigma_max)")
    hidden: int = option(64, "width of the fresh MLP student (analytic teachers; default %(default)s)")

    def resolve(self, teacher, loop) -> ExampleConfig:
        sigma = teacher.sigma_max if self.sigma is None else self.sigma
        return replace(self, sigma=common.check_sigma(teacher, sigma, "--sigma"))


class Example(Method):
    name = "example"

    def __init__(self, teacher, cfg: ExampleConfig | None = None):
        super().__init__()
        self.cfg = (cfg or ExampleConfig()).resolve(teacher, None)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = common.mlp_denoiser(teacher.shape, teacher.sigma_data, teacher.label_dim,
                                           sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max,
                                           hidden=self.cfg.hidden, depth=2)

    def groups(self) -> dict[str, Group]:
        return {"student": Group(list(self.student.parameters()), OptimConfig(lr=self.cfg.lr), loss=self.student_loss)}

    def student_loss(self, batch: Batch) -> dict[str, Tensor]:
        sigma = self.cfg.sigma
        x = sigma * torch.randn(batch.size, *self.teacher.shape, device=batch.device)
        with torch.no_grad():
            target = self.teacher(x, sigma, None)
        return {"loss": (self.student(x, sigma, None) - target).pow(2).mean()}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def export(self, ema=None):
        return (ema or {}).get("student", self.student), common.onestep_recipe(self.cfg.sigma)


def create(cfg: ExampleConfig, teacher, data=None, loop=None) -> Example:
    return Example(teacher, cfg)


SPEC = MethodSpec(name="example", help="example: a one-step student regressing the teacher's denoiser",
                  config=ExampleConfig, create=create, title="example")
