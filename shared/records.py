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
ACTION_VALIDATION = "validation_sums"
ACTION_PLACEMENTS = "validation_placements"
ACTION_EXTERNAL = "external_eval"
ACTION_RECALIBRATION = "recalibration_sums"  # one Newton step of the logistic recalibration
ACTION_TABULAR = "tabular"  # one step of a federated tabular fit (client/components.py)
ACTION_SECAGG_SETUP = "secagg_setup"
ACTION_SECAGG_SHARE = "secagg_share"
ACTION_SECAGG_MASKED = "secagg_masked"
ACTION_SECAGG_UNMASK = "secagg_unmask"

RC_ALLOW_LIST = "allow-list"  # run config: the coordinator's <pki>/authorized ("" = no PKI)

ROLE_TRAIN = "train"
ROLE_EXTERNAL = "external"
RECAL_INTERCEPT = "recal-intercept"  # ConfigRecord keys of ACTION_RECALIBRATION: the point
RECAL_SLOPE = "recal-slope"  # at which a site returns its recalibration sums
RECALIBRATION = "recalibration"  # external_eval config: JSON of the deep model's recalibration
CELL_STARTS = "cell-starts"  # validation_sums reply (cells policy): where each released cell begins
CELL_CANDIDATES = "cell-candidates"  # ... on a candidate grid of this many equal cells on [0, 1]
REPORT = "report"  # ConfigRecord key holding a JSON document of aggregate statistics
