"""The kit in a plugin author's pytest suite: one parametrized test, one test per check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cnn_train.plugins.conformance.runner import CHECKS, Check, checks_named, failed_requirement
from cnn_train.plugins.conformance.subject import BackendRef, NotApplicable, Subject


@dataclass(frozen=True)
class BoundCheck:
    """One check bound to one backend; calling it runs the check, raising on failure and skipping what does not apply."""

    check: Check
    backend: BackendRef

    def __call__(self) -> None:
        import pytest

        subject = Subject(self.backend)
        failed = failed_requirement(self.check, subject)
        if failed is not None:
            pytest.skip(f"{failed} failed")
        try:
            self.check.run(subject)
        except NotApplicable as why:
            pytest.skip(str(why))

    def __repr__(self) -> str:
        return self.check.name


def parametrize_with_checks(backend: BackendRef, *, expected_failures: Mapping[str, str] | None = None) -> Any:
    """A ``pytest.mark.parametrize`` over every check for ``backend``, ids being the check names.

    ``expected_failures`` maps a check name to the reason it is known to fail; those become strict xfails.
    """
    import pytest

    # The flows' list of known third-party noise, looked up only now: plugins/ never imports flows/ on import.
    from cnn_train.flows.quiet import HARMLESS_WARNINGS

    expected = dict(expected_failures or {})
    checks_named(expected)  # refuses unknown names, listing the known ones
    # pytest shows every DeprecationWarning; the author's own stay, the libraries' known ones are not theirs.
    quiet = [pytest.mark.filterwarnings(f"ignore:{message}:{kind.__name__}:{module}") for message, kind, module in HARMLESS_WARNINGS]
    params = [
        pytest.param(
            BoundCheck(check, backend),
            id=check.name,
            marks=quiet + ([pytest.mark.xfail(reason=expected[check.name], strict=True)] if check.name in expected else []),
        )
        for check in CHECKS
    ]
    return pytest.mark.parametrize("check", params)
