"""Metrics, library first: feature networks -> statistics -> numbers (FID, KID, IS, precision/recall), exact
metrics for analytic data, and the evaluation protocol (JSON records, evaluation during training). Metrics measure
the samples they are given (`evaluate(samples, ...)`: an iterable of batches); generating them is the samplers'
(`samplers.sample_batches`), and this package imports neither samplers nor teachers.

The names below are imported on first use (`diffdistill._lazy`): `from diffdistill.metrics import kid` imports
metrics/kid.py only, not scipy (toy metrics) or the Inception network.
"""

from .._lazy import install

_API = {
    **dict.fromkeys(["Classifier", "ClassifierConfig", "FeatureNet", "compute_features", "dataset_batches",
                     "load_classifier", "load_feature_net", "save_classifier"], ".features"),
    **dict.fromkeys(["feature_stats", "fid_from_features", "fid_from_stats", "frechet_distance", "load_ref_stats",
                     "save_ref_stats", "trace_sqrt_product"], ".fid"),
    **dict.fromkeys(["InceptionV3", "load_inception"], ".inception"),
    "inception_score": ".inception_score",
    "kid": ".kid",
    "precision_recall": ".precision_recall",
    **dict.fromkeys(["MetricOptions", "Reference", "TrainMetrics", "evaluate", "evaluate_toy", "make_train_metrics",
                     "result_record"], ".protocol"),
    **dict.fromkeys(["sliced_wasserstein", "toy_metrics"], ".toy"),
}

install(__name__, _API)
del install
