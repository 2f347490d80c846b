"""Parametrize tables of functions, each function named with its test id where it is defined, so a
table of cases is not a second list, kept by hand in the same order, of names already written above."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:  # what pytest.param returns; pytest does not export its class
    from _pytest.mark import ParameterSet

F = TypeVar("F", bound=Callable[..., object])


class Cases:
    """The functions registered with ``@cases("test-id")``, in the order they are defined; pass
    ``cases.params`` to ``pytest.mark.parametrize``."""

    def __init__(self) -> None:
        self.params: list[ParameterSet] = []

    def __call__(self, case_id: str) -> Callable[[F], F]:
        def register(function: F) -> F:
            self.params.append(pytest.param(function, id=case_id))
            return function

        return register
