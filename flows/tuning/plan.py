"""A tuning run's plan, checked before anything is recorded: the fixed run values, the space (every
corner of it a valid run), the options, and which study in which storage it continues."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnn_train.flows.params import ParameterError, RunnerOptions, RunParameters, TuneOptions, validate_parameters
from cnn_train.flows.ray_cluster import trials_on_ray
from cnn_train.flows.ray_join import check_runner
from cnn_train.flows.signatures import split_values, without_fixed_fields
from cnn_train.flows.settings import state_dir
from cnn_train.flows.tuning.space import SearchSpace, SpaceError, parse_space

#: Run values that do not change what a trial measures, so a study may continue with other ones.
_NOT_DEFINING = ("experiment", "data_dir", "prep_device", "train_device", "evaluate_device", "report_device")
#: Combinations of the space's corners checked before the study starts (every one below this).
_MAX_CORNERS = 4096


@dataclass(frozen=True)
class TunePlan:
    """Everything a tune flow run needs, validated."""

    options: TuneOptions
    runner: RunnerOptions
    run_values: dict[str, Any]
    base: RunParameters
    space: SearchSpace
    study_name: str
    storage_url: str

    def params_for(self, values: Mapping[str, Any]) -> RunParameters:
        """One trial's run parameters: the fixed values with the trial's sampled ones."""
        return validate_parameters(trial_on=_trial_on(self.runner), **(self.run_values | dict(values)))

    def definition(self) -> dict[str, Any]:
        return study_definition(self.base, self.space, self.options.objective)

    @property
    def target_trials(self) -> int:
        """Trials the study should hold; a grid holds at most one trial per grid point."""
        grid = self.space.grid()
        points = len(list(itertools.product(*grid.values()))) if grid else None
        return min(self.options.trials, points) if points else self.options.trials

    def cap_note(self) -> str | None:
        """Why the study ends before ``--trials``, when it does (said, or 2 trials for --trials 5 look cut short)."""
        target = self.target_trials
        if target >= self.options.trials:
            return None
        return f"the space holds {target} combination(s) of choices: the study ends at {target} trials, not {self.options.trials}"

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial can train (the pruners' budget)."""
        epochs = next((d for d in self.space.dimensions if d.name == "epochs"), None)
        return int(max(epochs.corners())) if epochs else self.base.epochs


def study_definition(base: RunParameters, space: SearchSpace, objective: str) -> dict[str, Any]:
    """What makes two invocations the same study: the space, the objective and the fixed run values."""
    fixed = {
        name: value for name, value in base.model_dump().items() if name not in _NOT_DEFINING and name not in space.names
    }
    return {"space": space.specs(), "objective": objective, "fixed": fixed}


def default_storage_url() -> str:
    """Optuna's SQLite file beside the project's other state, as an absolute URL."""
    return f"sqlite:///{state_dir() / 'optuna.db'}"


def default_study_name(definition: Mapping[str, Any], options: TuneOptions) -> str:
    """``tune-<fields>-<digest>``: the same command continues the same study, a different one starts anew."""
    keyed = dict(definition) | {"sampler": options.sampler, "pruner": options.pruner, "startup": options.startup_trials}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return "tune-" + "-".join(sorted(definition["space"])) + f"-{digest}"


def _trial_on(runner: RunnerOptions) -> str:
    return "ray" if trials_on_ray(runner) else "threads"


def _check_corners(run_values: dict[str, Any], space: SearchSpace, runner: RunnerOptions) -> None:
    """Every combination of the space's bounds is a valid run, so no trial fails on a bad value."""
    combos = itertools.islice(itertools.product(*(d.corners() for d in space.dimensions)), _MAX_CORNERS)
    for combo in combos:
        values = dict(zip(space.names, combo, strict=True))
        try:
            validate_parameters(trial_on=_trial_on(runner), **(run_values | values))
        except ParameterError as error:
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            raise SpaceError(f"space: {shown} is not a valid run: {error}") from None


def validate_tune(values: Mapping[str, Any]) -> TunePlan:
    """The plan for ``values`` (a flow's flat parameters); any problem is one ParameterError."""
    values, runner = split_values(values, RunnerOptions)
    check_runner(runner)
    run_values, options = split_values(values, TuneOptions)
    base = validate_parameters(trial_on=_trial_on(runner), **run_values)
    space = parse_space(without_fixed_fields(run_values, options.space, TuneOptions, "space"))
    if options.sampler == "grid" and space.grid() is None:
        raise SpaceError(
            f"space: sampler grid needs choices (A,B,C) for every field; {', '.join(space.ranges())} "
            "is a range: list values, or use sampler tpe or random"
        )
    _check_corners(run_values, space, runner)
    if options.storage:
        _check_storage_url(options.storage)
    name = options.study_name or default_study_name(study_definition(base, space, options.objective), options)
    return TunePlan(options, runner, dict(run_values), base, space, name, options.storage or default_storage_url())


#: The pip package of a database driver whose module is named otherwise (SQLAlchemy's default drivers).
_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "mysqldb": "mysqlclient"}


def _check_storage_url(url: str) -> None:
    """What can be known without connecting, refused before the study's flow run: the URL's form, its
    database kind and driver, and for SQLite the file's folder (SQLAlchemy says 'unable to open database file')."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # before ArgumentError, its base
        kind = "postgresql" if parsed.drivername.startswith("postgres") else "sqlite, postgresql or mysql"
        raise ParameterError(f"storage: SQLAlchemy knows no database kind {parsed.drivername!r}; use {kind}://...") from None
    except ArgumentError:
        raise ParameterError(
            f"storage: {url!r} is not a database URL; use e.g. sqlite:////abs/path/optuna.db or "
            "postgresql://user@host/db"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError:
        raise ParameterError(
            f"storage: {parsed.drivername} needs the Python driver {dialect.driver!r}, which is not installed: "
            f"pip install {_DRIVER_PACKAGES.get(dialect.driver, dialect.driver)}, or name one you have "
            f"({parsed.get_backend_name()}+DRIVER://...)"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        database = Path(parsed.database).expanduser()
        if database.is_dir():
            raise ParameterError(f"storage: {database} is a folder; name the SQLite file in it, e.g. {database / 'optuna.db'}")
        if not database.parent.is_dir():
            raise ParameterError(f"storage: the folder {database.parent} of {database} does not exist; create it first")
