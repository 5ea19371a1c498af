"""Metrics, library first: feature networks -> statistics -> numbers (FID, KID, IS, precision/recall), exact
metrics for analytic data, and the evaluation protocol (JSON records, evaluation during training)."""

from .features import (  # noqa: F401
    Classifier,
    ClassifierConfig,
    FeatureNet,
    compute_features,
    dataset_batches,
    load_classifier,
    load_feature_net,
    save_classifier,
)
from .fid import (  # noqa: F401
    feature_stats,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    load_ref_stats,
    save_ref_stats,
    trace_sqrt_product,
)
from .inception import InceptionV3, load_inception  # noqa: F401
from .inception_score import inception_score  # noqa: F401
from .kid import kid  # noqa: F401
from .precision_recall import precision_recall  # noqa: F401
from .protocol import MetricOptions, Reference, make_train_evaluator, result_record  # noqa: F401
from .toy import sliced_wasserstein, toy_metrics  # noqa: F401
