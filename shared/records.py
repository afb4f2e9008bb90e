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
ACTION_NORM_STATE = "norm_state"  # FedBN: a training site's normalisation state, once, at the end
ACTION_COMPARE = "external_compare"  # paired DeLong tests between the arms' final models
ACTION_SECAGG_SETUP = "secagg_setup"
ACTION_SECAGG_SHARE = "secagg_share"
ACTION_SECAGG_MASKED = "secagg_masked"
ACTION_SECAGG_CONSISTENCY = "secagg_consistency"  # the sites sign the survivor list
ACTION_SECAGG_UNMASK = "secagg_unmask"

# SecAgg+ (client/secagg.py): ConfigRecord keys of the coordinator's messages ...
SA_TAG = "secagg-tag"  # which secure aggregation ("<purpose>-<round>")
SA_CONFIG = "secagg-config"  # JSON of SecAggConfig (checked and fixed by the site at set-up)
SA_PUBLIC = "secagg-public"  # JSON node -> signed key advertisement
SA_INBOX = "secagg-inbox"  # JSON sender node -> encrypted share pair for this site
SA_SURVIVORS = "secagg-survivors"  # JSON list of the nodes whose masked vectors arrived
SA_DROPPED = "secagg-dropped"  # JSON list of the sharing nodes that sent no masked vector
SA_SIGNATURES = "secagg-signatures"  # JSON node -> signature of the survivor list
SA_PURPOSE = "secagg-purpose"  # train | validation_sums | validation_placements
SA_BOUND = "secagg-bound"  # scale of the pooled-validation sums
# ... and of the sites' replies (ConfigRecord INFO)
SA_SITE, SA_C_PK, SA_S_PK, SA_SIG = "site", "c_pk", "s_pk", "sig"
SA_CIPHERTEXTS = "cts"
SA_SHARES = "shares"
# where a site finds its identity key and its peers' public keys (node config, deployment) ...
NC_SECAGG_KEY = "secagg-key"
NC_SECAGG_PEERS = "secagg-peers"
NC_SECAGG_MIN_SITES = "secagg-min-sites"
RC_SECAGG_KEYS = "secagg-keys"  # ... (run config, simulation only: the harness's key folder)
RC_SECAGG_MIN_SITES = "secagg-min-sites"

RC_FEDBN = "fedbn"  # run config: 1 = the arm keeps normalisation layers at each site (FedBN)
NORM_INIT = "norm-init"  # FedBN: ArrayRecord of the normalisation state a site starts from
NORM_STATISTICS = "norm-statistics"  # external_eval config: "site" = test-time statistics;
# external_compare config: JSON list of the arms to score after the site's own statistics
SITE_STATS = "+external-stats"  # metrics.json: a FedBN arm with the external site's statistics
RC_ALLOW_LIST = "allow-list"  # run config: the coordinator's <pki>/authorized ("" = no PKI)

ROLE_TRAIN = "train"
ROLE_EXTERNAL = "external"
RECAL_INTERCEPT = "recal-intercept"  # ConfigRecord keys of ACTION_RECALIBRATION: the point
RECAL_SLOPE = "recal-slope"  # at which a site returns its recalibration sums
RECALIBRATION = "recalibration"  # external_eval config: JSON of the deep model's recalibration
CELL_STARTS = "cell-starts"  # validation_sums reply (cells policy): where each released cell begins
CELL_CANDIDATES = "cell-candidates"  # ... on a candidate grid of this many equal cells on [0, 1]
REPORT = "report"  # ConfigRecord key holding a JSON document of aggregate statistics
COMPARE_ARMS = "arms"  # external_compare config: JSON list of arm names, in order ...
COMPARE_MODEL = "model-"  # ... and the ArrayRecord of arm i is "model-<i>"
MAX_COMPARED = 16  # the most models one external_compare message may carry
RC_STAGE = "stage"  # run config: "compare" runs the comparison stage instead of an arm
RC_COMPARE = "compare"  # ... with this run config key: JSON {arm: model file}
