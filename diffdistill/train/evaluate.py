"""Evaluation during training: the loop's evaluate hook, which samples the student and has it measured.

`make_train_evaluator(...)` -> `TrainEvaluator`, `evaluator(method, ema, nimg) -> {key: float}`. The student is
`method.export(ema)` (what RUN/best and RUN/model would hold), sampled by its own recipe from the same seeds at
every evaluation (`samplers.sample_batches`), split across ranks (`metrics.protocol.rank_shard`); the protocol
and the numbers are `metrics.protocol.TrainMetrics`'s, which measures the batches it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DiffdistillError
from ..metrics.protocol import MetricOptions, TrainMetrics, is_mixture, make_train_metrics, parse_metrics, rank_shard
from ..samplers import sample_batches


def module_device(module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class TrainEvaluator:
    """The training loop's evaluation hook, `evaluator(method, ema, nimg) -> {key: float}` (every rank returns
    the same dict), made by `make_train_evaluator`. `metrics` is its protocol (`TrainMetrics`): the keys
    ('fid', or with `labelled` 'fid-10k/inception'), `best()` and `describe()` are its."""

    def __init__(self, metrics: TrainMetrics):
        self.metrics = metrics

    def key(self, name: str) -> str:
        return self.metrics.key(name)

    def best(self) -> tuple[str, str] | None:
        return self.metrics.best()

    def describe(self) -> dict:
        return self.metrics.describe()

    @torch.no_grad()
    def __call__(self, method, ema=None, nimg: int | None = None) -> dict:
        denoiser, sampling = method.export(ema)
        was_training = denoiser.training
        denoiser.eval()
        try:
            device = module_device(denoiser)
            m = self.metrics
            batches = sample_batches(denoiser, rank_shard(m.seeds), sampling, device, m.batch, clamp=not m.toy)
            return m.measure(batches, device)
        finally:
            denoiser.train(was_training)


def make_train_evaluator(metric: str | Sequence[str], feature_net=None, ref=None, n: int = 10_000,
                         seeds: Sequence[int] | None = None, *, batch: int = 256, inception: str | None = None,
                         resize: str = "tf1", options: MetricOptions | None = None,
                         shape: Sequence[int] | None = None, labelled: bool = False) -> TrainEvaluator:
    """The evaluation hook `evaluate(method, ema, nimg) -> {name: float}` of the training loop (`TrainEvaluator`).

    metric: 'fid', 'kid', 'is', 'pr' (comma-separated or a list) or 'toy'. feature_net: a `FeatureNet` or a
    `load_feature_net` spec (with `inception`, `resize`). ref: a reference `.npz`, a data spec, a `Reference`,
    or, for 'toy', a `GaussianMixture` or an analytic spec (toy:ring8, gmm:PATH.json). Samples come from `seeds`
    (default 0..n-1). shape: the samples' shape, checked against the feature network now. Everything that would
    fail at the first evaluation fails here instead (`metrics.protocol.make_train_metrics`).
    """
    if parse_metrics(metric) == ["toy"]:
        if isinstance(ref, str):
            from ..teachers.analytic import is_analytic_spec, load_analytic

            if is_analytic_spec(ref):
                ref = load_analytic(ref)
        if not is_mixture(ref):
            raise DiffdistillError("the 'toy' metrics need the analytic data (a GaussianMixture or a "
                                   "toy:/gmm: spec)")
    return TrainEvaluator(make_train_metrics(metric, feature_net, ref, n, seeds, batch=batch, inception=inception,
                                             resize=resize, options=options, shape=shape, labelled=labelled))


def evaluation_plan(evaluator=None, own=None, own_best: str | None = None, eval_kimg: float | None = None,
                    total_kimg: float | None = None) -> tuple[dict, object]:
    """The loop's evaluate hook and the TrainConfig fields that go with it, as `(fields, evaluate)`; `fields` is
    empty and `evaluate` None when there is nothing to evaluate.

    evaluator: a `TrainEvaluator` (metrics measured during training). own: a method's own evaluation (KD:
    held-out loss, which also picks the model its export returns) and `own_best` its metric that picks RUN/best
    without metrics. With both, one hook returns both results (the method's first, so that the metrics measure
    the model its export returns then) and the metric picks RUN/best. Fields: eval_kimg (default: 10 evaluations
    in `total_kimg`), best_metric/best_mode and the protocol (`meta_eval`, for config.json's meta['eval'])."""
    if evaluator is None and own is None:
        return {}, None
    if not eval_kimg:
        if not total_kimg:
            raise DiffdistillError("evaluation during training: give eval_kimg (the run's length is not known)")
        eval_kimg = max(total_kimg / 10, 1e-3)
    best = evaluator.best() if evaluator is not None else None
    best_metric, best_mode = best if best is not None else (own_best, "min")   # only pr: the method's
    fields = dict(eval_kimg=eval_kimg, best_metric=best_metric, best_mode=best_mode)
    if evaluator is None:
        return fields, own
    fields["meta_eval"] = evaluator.describe()
    if own is None:
        return fields, evaluator

    def evaluate(method, ema, nimg):
        return {**(own(method, ema, nimg) or {}), **evaluator(method, ema, nimg)}

    return fields, evaluate
