"""Names shared by the ServerApp and the ClientApp (message actions, record keys, run config).

Plain strings only: this module does not import Flower.
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"
NUM_EXAMPLES = "num-examples"

ACTION_SITE_INFO = "site_info"
ACTION_THRESHOLD = "threshold_stats"
ACTION_EXTERNAL = "external_eval"

ROLE_TRAIN = "train"
ROLE_EXTERNAL = "external"

EXTERNAL_NUMERIC_KEYS = (
    "n", "n_pos", "auc", "auc_lower", "auc_upper", "auc_variance", "threshold", "sensitivity",
    "specificity", "accuracy", "ppv", "npv", "tp", "fp", "tn", "fn", "loss",
)
