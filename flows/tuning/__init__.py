"""Hyperparameter search with Optuna for the ``cnn-train-tune`` flow.

- :mod:`.space`: the search space, from ``FIELD=SPEC`` strings or a YAML/JSON file.
- :mod:`.plan`: the validated plan of one invocation (fixed values, space, study name, storage).
- :mod:`.study`: the Optuna study (storage, sampler, pruner), continuing it, recovering abandoned trials.
- :mod:`.ranking`: how trials ended and the ranking table.
- :mod:`.figures`: Optuna's matplotlib figures, checked non-blank.
- :mod:`.record`: what the parent MLflow run and Prefect show at the end.
"""

from cnn_train.flows.tuning.plan import TunePlan, default_storage_url, validate_tune
from cnn_train.flows.tuning.ranking import (
    MODEL_URI_ATTR,
    STATE_TAG,
    TEST_ACCURACY_ATTR,
    pruned_label,
    ranking_table,
    state_label,
)
from cnn_train.flows.tuning.space import (
    FORMS,
    Dimension,
    SearchSpace,
    SpaceError,
    load_space_file,
    parse_assignments,
    parse_space,
)
from cnn_train.flows.tuning.study import (
    ERROR_ATTR,
    EXPERIMENT_ATTR,
    OWNER_ATTR,
    PARENT_ATTR,
    RUN_ATTR,
    TrialHeartbeat,
    ask,
    check_continuation,
    claim,
    counted_trials,
    ended_trials,
    open_study,
    owner,
    recover_abandoned,
    redacted_url,
    requeue_interrupted,
    tell,
    waiting_trials,
)

__all__ = [
    "ERROR_ATTR",
    "EXPERIMENT_ATTR",
    "FORMS",
    "MODEL_URI_ATTR",
    "OWNER_ATTR",
    "PARENT_ATTR",
    "RUN_ATTR",
    "STATE_TAG",
    "TEST_ACCURACY_ATTR",
    "Dimension",
    "SearchSpace",
    "SpaceError",
    "TrialHeartbeat",
    "TunePlan",
    "ask",
    "check_continuation",
    "claim",
    "counted_trials",
    "default_storage_url",
    "ended_trials",
    "load_space_file",
    "open_study",
    "owner",
    "parse_assignments",
    "parse_space",
    "pruned_label",
    "ranking_table",
    "recover_abandoned",
    "redacted_url",
    "requeue_interrupted",
    "state_label",
    "tell",
    "validate_tune",
    "waiting_trials",
]
