"""The checks in order, and running them: each passes, fails with the reason, or is skipped with the reason.

A check runs only when the checks it requires passed or did not apply, so a backend that cannot be
loaded, or lacks a contract member, gets one failing check and the others report that they were not run.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from cnn_train.plugins.conformance import checks, devices, isolation, lifecycle, model_logging
from cnn_train.plugins.conformance.subject import BackendRef, NotApplicable, Subject

CheckFunction = Callable[[Subject], None]


@dataclass(frozen=True)
class Check:
    """A named contract check and the checks that must not have failed before it runs."""

    name: str
    function: CheckFunction
    requires: tuple[str, ...] = ()


def _check(function: CheckFunction, *, requires: tuple[str, ...]) -> Check:
    return Check(function.__name__.removeprefix("check_"), function, requires)


_LOADS = ("entry_point_load",)
_KEEPS_CONTRACT = ("entry_point_load", "contract_members")

#: Every check, each after the checks it requires.
CHECKS: tuple[Check, ...] = (
    _check(checks.check_entry_point_load, requires=()),
    _check(checks.check_contract_members, requires=_LOADS),
    *(
        _check(function, requires=_KEEPS_CONTRACT)
        for function in (
            checks.check_parameter_counts,
            checks.check_custom_config_parameter_count,
            checks.check_feature_maps_shapes,
            checks.check_first_conv_kernels_shape,
            checks.check_smoke_train,
            lifecycle.check_stops_when_asked,
            checks.check_evaluate,
            checks.check_predict_proba,
            checks.check_save_load_round_trip,
            lifecycle.check_resume,
            checks.check_cpu_determinism,
            checks.check_training_options,
            checks.check_rejects_wrong_image_shape,
            checks.check_rejects_empty_data,
            checks.check_rejects_labels_out_of_range,
            devices.check_uses_given_device,
            isolation.check_leaves_process_wide_generators_alone,
            isolation.check_does_not_log_to_mlflow,
            model_logging.check_model_logging,
        )
    ),
)
CHECK_NAMES: tuple[str, ...] = tuple(check.name for check in CHECKS)
_BY_NAME: Mapping[str, Check] = {check.name: check for check in CHECKS}


class CheckStatus(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckResult:
    """How one check went; ``reason`` says why it failed or was skipped, and is empty when it passed."""

    name: str
    status: CheckStatus
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.PASSED

    @property
    def failed(self) -> bool:
        return self.status is CheckStatus.FAILED

    @property
    def skipped(self) -> bool:
        return self.status is CheckStatus.SKIPPED

    def line(self) -> str:
        """``PASS name``, ``FAIL name: reason`` or ``SKIP name: reason``, as ``cnn-train check-backend`` prints it."""
        label = {CheckStatus.PASSED: "PASS", CheckStatus.FAILED: "FAIL", CheckStatus.SKIPPED: "SKIP"}[self.status]
        return f"{label} {self.name}: {self.reason}" if self.reason else f"{label} {self.name}"


def checks_named(names: Collection[str]) -> list[Check]:
    """The checks called ``names``, in kit order; raises ValueError naming the unknown ones and the known."""
    unknown = sorted(set(names) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; available: {', '.join(CHECK_NAMES)}")
    return [check for check in CHECKS if check.name in names]


def _describe(error: Exception) -> str:
    reason = str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
    return reason.replace("\n", " ")


def _attempt(check: Check, subject: Subject) -> CheckResult:
    try:
        check.function(subject)
    except NotApplicable as why:
        return CheckResult(check.name, CheckStatus.SKIPPED, str(why))
    except Exception as error:  # a check's failure is data here, not a crash
        return CheckResult(check.name, CheckStatus.FAILED, _describe(error))
    return CheckResult(check.name, CheckStatus.PASSED)


def _results(subject: Subject, names: Collection[str]) -> dict[str, CheckResult]:
    """Results of the named checks and of the checks they require, run in kit order."""
    wanted = set(names).union(*(_BY_NAME[name].requires for name in names))
    results: dict[str, CheckResult] = {}
    for check in CHECKS:
        if check.name not in wanted:
            continue
        failed = next((name for name in check.requires if results[name].failed), None)
        if failed is None:
            results[check.name] = _attempt(check, subject)
        else:
            results[check.name] = CheckResult(check.name, CheckStatus.SKIPPED, f"{failed} failed")
    return results


def failed_requirement(check: Check, subject: Subject) -> str | None:
    """The first check that ``check`` requires and that fails for ``subject``, if any."""
    results = _results(subject, check.requires)
    return next((name for name in check.requires if results[name].failed), None)


def run_checks(backend: BackendRef, *, only: Collection[str] | None = None) -> list[CheckResult]:
    """Run every check (or those named in ``only``) against a registered name or a backend class."""
    selected = checks_named(only) if only else list(CHECKS)
    results = _results(Subject(backend), [check.name for check in selected])
    return [results[check.name] for check in selected]
