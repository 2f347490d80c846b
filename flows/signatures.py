"""What is derived from the one declaration of run parameters (flows/params.py): a flow's signature
(and so its Prefect form), argparse options for scripts and benchmarks, and the README's table; and,
the other way, a flow's flat values split back into the declaration's models."""

from __future__ import annotations

import functools
import inspect
import shlex
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cnn_train.flows.params import ParameterError, RunParameters, training_defaults
from cnn_train.plugins.config import format_validation_error

#: Fields a sweep's grid or a study's space may vary. Data-shaping fields are fixed per search: data prep runs once.
SEARCHABLE = ("backend", "architecture", "epochs", "batch_size", "learning_rate", "seed")


def declared_fields(
    models: Iterable[type[BaseModel]], exclude: Iterable[str] = ()
) -> dict[str, tuple[Any, FieldInfo]]:
    """Name -> (annotation, declaration) of the models' fields, in order, less ``exclude``."""
    excluded = set(exclude)
    fields: dict[str, tuple[Any, FieldInfo]] = {}
    for model in models:
        hints = _resolved_annotations(model)
        for name, info in model.model_fields.items():
            if name not in excluded:
                fields[name] = (hints[name], info)
    return fields


@functools.cache  # the declarations never change; every flow, option and argparse type reads them
def _resolved_annotations(model: type[BaseModel]) -> dict[str, Any]:
    return typing.get_type_hints(model, include_extras=True)


def takes_parameters(
    *models: type[BaseModel], exclude: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a ``def flow(**values)`` the models' fields as its signature, so Prefect builds the form
    (types, dropdowns for closed choices, defaults, descriptions) from the one declaration."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        parameters = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=Field(default=info.default, description=form_description(info), json_schema_extra=info.json_schema_extra),
                annotation=_with_bounds(annotation, info),
            )
            for name, (annotation, info) in declared_fields(models, exclude).items()
        ]
        fn.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
        return fn

    return decorate


#: Constraints JSON Schema can state (minimum, exclusiveMaximum, minLength...): in the form, the UI and
#: the Prefect server check them, so a deployment run with a value out of bounds is refused before it exists.
_SCHEMA_BOUNDS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt,
                  annotated_types.MinLen, annotated_types.MaxLen)


def _with_bounds(annotation: Any, info: FieldInfo) -> Any:
    """``annotation`` with the declaration's bounds on it (``ge=1`` ...), for the flow's parameter schema."""
    bounds = [constraint for constraint in info.metadata if isinstance(constraint, _SCHEMA_BOUNDS)]
    return Annotated[(annotation, *bounds)] if bounds else annotation


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _constraints(info: FieldInfo, names: Iterable[str]) -> dict[str, Any]:
    """The declaration's constraints called ``names`` (``ge``, ``lt``, ``min_length``...) that it sets, in that order."""
    found = {name: value for item in info.metadata for name in names if (value := getattr(item, name, None)) is not None}
    return {name: found[name] for name in names if name in found}


def bounds_in_words(info: FieldInfo) -> str | None:
    """A field's numeric bounds as a reader says them (``from 20 to 60,000``, ``at least 1``), or None."""
    found = _constraints(info, ("ge", "gt", "le", "lt"))
    if isinstance(found.get("lt"), int) and "ge" in found:  # whole numbers below 2**32: at most 2**32 - 1
        found["le"] = found.pop("lt") - 1
    low = f"{_number(found['ge'])}" if "ge" in found else None
    high = f"{_number(found['le'])}" if "le" in found else None
    if low and high:
        return f"from {low} to {high}"
    above = f"more than {_number(found['gt'])}" if "gt" in found else f"at least {low}" if low else None
    below = f"less than {_number(found['lt'])}" if "lt" in found else f"at most {high}" if high else None
    return " and ".join(filter(None, (above, below))) or None


def form_description(info: FieldInfo) -> str | None:
    """The description a form shows: the declaration's, and the bounds it allows (the form's own error
    for a value out of bounds, "is not valid under any of the given schemas", names none)."""
    bounds = bounds_in_words(info)
    return f"{info.description} Allowed: {bounds}." if bounds and info.description else info.description


def add_arguments(parser: Any, names: Iterable[str]) -> None:
    """argparse options (``--sample-limit`` ...) for the named run parameters, for scripts and benchmarks."""
    hints = _resolved_annotations(RunParameters)
    for name in names:
        info = RunParameters.model_fields[name]
        flag = "--" + name.replace("_", "-")
        if bool in (hints[name], *get_args(hints[name])):
            parser.add_argument(flag, action="store_true", help=info.description)
        else:
            parser.add_argument(flag, type=declared_type(name), default=info.default, help=info.description)


def declared_type(name: str) -> Callable[[str], Any]:
    """An argparse ``type`` for run parameter ``name`` that also holds the declaration's bounds
    (``--sample-limit -5`` ran until the flow refused it), refusing a value in the declaration's words."""
    import argparse

    hint, info = _resolved_annotations(RunParameters)[name], RunParameters.model_fields[name]
    scalar = next((t for t in (int, float) if t in (hint, *get_args(hint))), str)
    adapter = TypeAdapter(Annotated[(scalar, *info.metadata)]) if info.metadata else None

    def convert(text: str) -> Any:
        try:
            value = scalar(text)
            return adapter.validate_python(value) if adapter is not None else value
        except ValidationError as error:
            raise argparse.ArgumentTypeError(f"{text}: {error.errors()[0]['msg']}") from None

    convert.__name__ = scalar.__name__  # argparse names it in "invalid int value: 'x'"
    return convert


def assignments(values: Mapping[str, Any]) -> str:
    """``name=value`` pairs as a trial's values read (``batch_size=64, learning_rate=0.0029...``), exact."""
    return ", ".join(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}" for name, value in values.items())


def run_command(params: RunParameters) -> str:
    """The ``cnn-train run`` command that trains with ``params``: each value not its declared default as
    its option (a search's best trial, trained again on its own). The architecture's own epochs, batch
    size and learning rate are its defaults too."""
    words = ["cnn-train", "run"]
    declared = {name: info.default for name, info in RunParameters.model_fields.items()}
    defaults = declared | training_defaults(params.architecture)
    for name, value in params.model_dump().items():
        if value is None or value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words)


#: How a search's record gives :func:`train_again`'s answer (a watched trigger looks for the line).
TRAIN_AGAIN = "Train it again: "


def train_again(params: RunParameters, split_seed: int) -> str:
    """How to train a search's trial ``params`` again on its own: the ``cnn-train run`` command (in backquotes),
    or why none does exactly. A search splits the data once, by ``split_seed``; ``run --seed`` sets the split too."""
    if params.seed != split_seed:
        return (f"no `cnn-train run` does exactly: its seed {params.seed} varied the weights and shuffles only, on "
                f"the split of seed {split_seed}, and `cnn-train run --seed` sets both")
    return f"`{run_command(params)}`"


def _choices(annotation: Any) -> list[Any]:
    """The values of every Literal inside ``annotation`` (through Annotated and unions)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [choice for arg in get_args(annotation) for choice in _choices(arg)]


def _allowed(annotation: Any, info: FieldInfo) -> str:
    """What a field accepts, read from its type and constraints."""
    choices = _choices(annotation)
    words = [" / ".join(f"`{choice}`" for choice in choices)] if choices else []
    if "cuda" in (info.description or ""):
        words.append("`cuda:N`")
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    for name, value in _constraints(info, symbols).items():
        words.append(f"{symbols[name]} {value:,}" if isinstance(value, int) else f"{symbols[name]} {value}")
    return ", ".join(words) or "any"


def parameter_table() -> str:
    """The README's parameter table, rendered from the declaration (a test keeps the README in step)."""
    lines = ["| parameter | default | allowed | meaning |", "|---|---|---|---|"]
    for name, (annotation, info) in declared_fields([RunParameters]).items():
        default = "empty" if info.default is None else f"`{str(info.default).lower() if isinstance(info.default, bool) else info.default}`"
        lines.append(f"| `{name}` | {default} | {_allowed(annotation, info)} | {info.description} |")
    return "\n".join(lines)


Options = TypeVar("Options", bound=BaseModel)


def split_values(values: Mapping[str, Any], options: type[Options]) -> tuple[dict[str, Any], Options]:
    """A flow's flat values as run values and its own validated options."""
    own = {name: values[name] for name in options.model_fields if name in values}
    try:
        parsed = options(**own)
    except ValidationError as error:
        raise ParameterError("invalid parameters: " + format_validation_error(error)) from None
    return {name: value for name, value in values.items() if name not in own}, parsed


def without_fixed_fields(
    run_values: Mapping[str, Any], varied: dict[str, Any], options: type[BaseModel], option: str, *,
    given: Collection[str] = (),
) -> dict[str, Any]:
    """``varied`` (a sweep's grid, a study's space: ``options``' field ``option``) without the fields the
    run sets to a value of its own, or that are ``given`` (set explicitly, even to the default: only the
    command line can tell). The default ``option`` gives way to such a field; one the user gave
    that varies it too is refused, since one of the two would be silently ignored. A field no search may
    vary (not in :data:`SEARCHABLE`) is left for the caller to refuse as such."""
    fixed = {
        name: run_values[name] for name in varied
        if name in SEARCHABLE and name in run_values
        and (name in given or run_values[name] != RunParameters.model_fields[name].default)
    }
    if not fixed:
        return varied
    if varied == options.model_fields[option].default:
        if left := {name: values for name, values in varied.items() if name not in fixed}:
            return left
        raise ParameterError(
            f"{option}: the run sets every field the default {option} varies ({', '.join(sorted(fixed))}); "
            f"give a {option} of fields to vary"
        )
    name, value = next(iter(fixed.items()))
    raise ParameterError(
        f"{option}: {name} is set to {value!r} and also varied by the {option} ({varied[name]!r}); "
        f"give it in one place: leave {name} unset or take it out of the {option}"
    )
