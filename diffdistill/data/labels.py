"""Class labels of a data set against a model's classes: checked before any work (one line, not a traceback)."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError


def check_labels(data, model, data_name, model_name, what: str = "teacher") -> None:
    """Refuse labelled `data` whose class labels a class-conditional `model` (its `label_dim` classes) cannot
    take. Unlabelled data, an unconditional model (it ignores labels) and labels within 0..label_dim-1 pass."""
    label_dim = int(getattr(model, "label_dim", 0) or 0)
    labels = getattr(data, "labels", None)
    if label_dim == 0 or labels is None or not getattr(data, "label_dim", 0):
        return
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    top = int(labels.max())
    if top >= label_dim:
        raise UsageError(f"--data {data_name} has class labels 0..{top} ({top + 1} classes), the {what} "
                         f"{model_name} knows {label_dim} (0..{label_dim - 1}); use data labelled with the "
                         f"{what}'s classes")
