"""The conformance kit: named checks that any backend must pass, shipped for plugin authors.

Run it from the command line with ``cnn-train check-backend NAME``, or from pytest with one
test function in your own test file::

    from cnn_train.plugins.conformance import parametrize_with_checks

    @parametrize_with_checks("my-backend")
    def test_conformance(check):
        check()

Test ids are the check names, so ``pytest -k save_load_round_trip`` runs one check. A check that
does not apply to the backend (feature maps of a network without convolutions, say) is skipped with
the reason, and so is every check after a failed one it needs (a backend that lacks a contract
member fails ``contract_members`` once). Checks use small synthetic data and one to three epochs on
the CPU; the model logging check goes through MLflow into a throwaway store.
"""

from cnn_train.plugins.conformance.runner import CHECK_NAMES, CHECKS, Check, CheckResult, CheckStatus, run_checks
from cnn_train.plugins.conformance.testing import parametrize_with_checks

__all__ = ["CHECKS", "CHECK_NAMES", "Check", "CheckResult", "CheckStatus", "parametrize_with_checks", "run_checks"]
