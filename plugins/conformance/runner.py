"""The checks in order, and running them: each passes, fails with the reason, or is skipped with the reason.

A check runs only when the checks it requires passed or did not apply, so a backend that cannot be
loaded, or lacks a contract member, gets one failing check and the others report that they were not run;
one whose smoke training fails gets that failure once, and the checks that train are not run.
"""

from __future__ import annotations

import enum
import sys
import traceback
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from cnn_train.plugins.conformance import checks, devices, isolation, lifecycle, model_logging
from cnn_train.plugins.conformance.subject import BackendRef, NotApplicable, Subject

CheckFunction = Callable[[Subject], None]


@dataclass(frozen=True)
class Check:
    """A named contract check and the checks that must not have failed before it runs."""

    name: str
    function: CheckFunction
    requires: tuple[str, ...] = ()

    def run(self, subject: Subject) -> None:
        """The check, with whatever the backend sends to MLflow kept out of the user's stores."""
        with isolation.throwaway_tracking():
            self.function(subject)


def _check(function: CheckFunction, *, requires: tuple[str, ...]) -> Check:
    return Check(function.__name__.removeprefix("check_"), function, requires)


_LOADS = ("entry_point_load",)
_KEEPS_CONTRACT = ("entry_point_load", "contract_members")
#: A training that fails fails every check that trains the same way: those wait for the smoke training.
_TRAINS = (*_KEEPS_CONTRACT, "smoke_train")
#: The checks that train, beyond the smoke training itself.
_TRAINING_CHECKS = frozenset({
    checks.check_evaluate, checks.check_predict_proba, lifecycle.check_stops_when_asked,
    checks.check_save_load_round_trip, lifecycle.check_resume, checks.check_cpu_determinism,
    checks.check_seed_changes_training, checks.check_training_options, devices.check_uses_given_device,
    isolation.check_leaves_process_wide_generators_alone, isolation.check_does_not_log_to_mlflow,
    model_logging.check_model_logging,
})

#: Every check, each after the checks it requires.
CHECKS: tuple[Check, ...] = (
    _check(checks.check_entry_point_load, requires=()),
    _check(checks.check_contract_members, requires=_LOADS),
    *(
        _check(function, requires=_TRAINS if function in _TRAINING_CHECKS else _KEEPS_CONTRACT)
        for function in (
            checks.check_parameter_counts,
            checks.check_custom_config_parameter_count,
            checks.check_feature_maps_shapes,
            checks.check_first_conv_kernels_shape,
            checks.check_smoke_train,
            checks.check_evaluate,
            checks.check_predict_proba,
            lifecycle.check_stops_when_asked,
            checks.check_save_load_round_trip,
            lifecycle.check_resume,
            checks.check_cpu_determinism,
            checks.check_seed_changes_training,
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
    #: The check does not apply to this backend (feature maps of a network without convolutions).
    SKIPPED = "skipped"
    #: A check it requires failed, so it was not run.
    NOT_RUN = "not run"


@dataclass(frozen=True)
class CheckResult:
    """How one check went; ``reason`` says why it failed, was skipped or was not run, and is empty when it passed."""

    name: str
    status: CheckStatus
    reason: str = ""
    #: Where in the backend's own code the failure was raised (``package/module.py:57 in fit``), if there.
    where: str = ""
    #: The failure's traceback, as ``cnn-train --debug check-backend`` prints it.
    details: str = ""

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
        """``PASS name``, ``FAIL name: reason``, ``SKIP name: reason`` or ``NOT RUN name: reason``, as
        ``cnn-train check-backend`` prints it."""
        label = {
            CheckStatus.PASSED: "PASS", CheckStatus.FAILED: "FAIL", CheckStatus.SKIPPED: "SKIP", CheckStatus.NOT_RUN: "NOT RUN"
        }[self.status]
        reason = f"{self.reason} (raised at {self.where})" if self.where else self.reason
        return f"{label} {self.name}: {reason}" if reason else f"{label} {self.name}"


def checks_named(names: Collection[str]) -> list[Check]:
    """The checks called ``names``, in kit order; raises ValueError naming the unknown ones and the known."""
    unknown = sorted(set(names) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; available: {', '.join(CHECK_NAMES)}")
    return [check for check in CHECKS if check.name in names]


def _describe(error: Exception) -> str:
    reason = str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
    return reason.replace("\n", " ")


_KIT = Path(__file__).resolve().parent


def _backend_source(subject: Subject) -> Path | None:
    """The backend's top-level package folder (or its module file, outside a package), if it has one."""
    try:
        name = subject.cls.__module__
    except Exception:  # the class does not load: entry_point_load says so
        return None
    top = sys.modules.get(name.partition(".")[0])
    if getattr(top, "__file__", None) is None:  # a namespace package: the class's own module's folder
        file = getattr(sys.modules.get(name), "__file__", None)
        return Path(file).resolve().parent if file else None
    return Path(top.__file__).resolve().parent if hasattr(top, "__path__") else Path(top.__file__).resolve()


def _where(error: BaseException, subject: Subject) -> str:
    """The innermost frame of the backend's own code that the failure passed through, as
    ``package/module.py:57 in fit``; empty for the kit's own verdicts and failures outside the backend."""
    source = _backend_source(subject)
    if source is None:
        return ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        file = Path(frame.filename).resolve()
        if (file == source or file.is_relative_to(source)) and not file.is_relative_to(_KIT):
            return f"{file.relative_to(source.parent)}:{frame.lineno} in {frame.name}"
    return ""


def _attempt(check: Check, subject: Subject) -> CheckResult:
    try:
        check.run(subject)
    except NotApplicable as why:
        return CheckResult(check.name, CheckStatus.SKIPPED, str(why))
    except Exception as error:  # a check's failure is data here, not a crash
        details = "".join(traceback.format_exception(error))
        return CheckResult(check.name, CheckStatus.FAILED, _describe(error), _where(error, subject), details)
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
            results[check.name] = CheckResult(check.name, CheckStatus.NOT_RUN, f"{failed} failed")
    return results


#: The smoke training's result per backend class: pytest runs each check as a test of its own, and one
#: smoke training then serves every check that waits for it.
_SMOKE_RESULTS: weakref.WeakKeyDictionary[type, CheckResult] = weakref.WeakKeyDictionary()


def failed_requirement(check: Check, subject: Subject) -> str | None:
    """The first check that ``check`` requires and that fails for ``subject``, if any."""
    gates = [name for name in check.requires if name != "smoke_train"]
    results = _results(subject, gates)
    failed = next((name for name in gates if results[name].failed), None)
    if failed is None and "smoke_train" in check.requires:
        if subject.cls not in _SMOKE_RESULTS:
            _SMOKE_RESULTS[subject.cls] = _attempt(_BY_NAME["smoke_train"], subject)
        failed = "smoke_train" if _SMOKE_RESULTS[subject.cls].failed else None
    return failed


def run_checks(backend: BackendRef, *, only: Collection[str] | None = None) -> list[CheckResult]:
    """Run every check (or those named in ``only``) against a registered name or a backend class."""
    selected = checks_named(only) if only else list(CHECKS)
    results = _results(Subject(backend), [check.name for check in selected])
    return [results[check.name] for check in selected]
