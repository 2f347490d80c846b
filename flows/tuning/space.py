"""A tuning search space: which run fields vary and over what, read from ``FIELD=SPEC`` strings or a
YAML/JSON file, and handed to Optuna's ``suggest_*`` calls.

A SPEC is one of ``log:LOW:HIGH`` (a float drawn on a log scale; for a whole-number field such as
``batch_size``, a whole number on a log scale), ``int:LOW:HIGH`` (a whole number), ``float:LOW:HIGH``
(a float) or ``A,B,C`` (one of the listed values; numbers stay numbers). Anything else, a value
listed twice (1 and 1.0 alike), and a float range for a whole-number field, is refused with one line
naming the field and these forms. A file is read with YAML 1.2's floats (``1e-3`` is a number) and
refuses a field given twice, as two ``--space`` items for one field are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cnn_train.flows.errors import did_you_mean
from cnn_train.flows.params import WHOLE_NUMBERS, ParameterError, RunParameters
from cnn_train.flows.signatures import SEARCHABLE

FORMS = "log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH or A,B,C"

Kind = Literal["log", "int", "float", "choice"]


class SpaceError(ParameterError):
    """A search space that cannot be searched; the message names the field and the accepted forms."""


@dataclass(frozen=True)
class Dimension:
    """One field of the space: a range (``log``, ``int``, ``float``) or a list of choices."""

    name: str
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def whole(self) -> bool:
        """A range of whole numbers: ``int``, or ``log`` over a whole-number field (``batch_size``...)."""
        return self.kind == "int" or (self.kind == "log" and self.name in WHOLE_NUMBERS)

    def suggest(self, trial: Any) -> Any:
        """This field's value for an Optuna trial (a re-queued trial gets its earlier value back)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.whole:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.kind == "log")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def corners(self) -> tuple[Any, ...]:
        """The values that bound this field: each choice, or a range's two ends."""
        if self.kind == "choice":
            return self.choices
        if self.whole:
            return int(self.low), int(self.high)
        return self.low, self.high

    def spec(self) -> str:
        """The canonical ``SPEC`` text, as a person would type it."""
        if self.kind == "choice":
            return ",".join(str(choice) for choice in self.choices)
        if self.whole:
            return f"{self.kind}:{int(self.low)}:{int(self.high)}"
        return f"{self.kind}:{self.low:g}:{self.high:g}"


@dataclass(frozen=True)
class SearchSpace:
    """The fields a study varies, in a stable (alphabetical) order."""

    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def specs(self) -> dict[str, str]:
        return {d.name: d.spec() for d in self.dimensions}

    def grid(self) -> dict[str, list[Any]] | None:
        """Every field's choices for Optuna's GridSampler, or None when some field is a range."""
        if any(d.kind != "choice" for d in self.dimensions):
            return None
        return {d.name: list(d.choices) for d in self.dimensions}

    def ranges(self) -> list[str]:
        return [d.name for d in self.dimensions if d.kind != "choice"]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.specs(), sort_keys=True).encode()).hexdigest()


def _bad(field: str, text: object, reason: str) -> SpaceError:
    return SpaceError(f"space: {field}={text!r} {reason}; use {FORMS}")


def _choice_value(text: str) -> Any:
    """``"64"`` -> 64, ``"1e-3"`` -> 0.001, ``"cnn"`` -> "cnn" (JSON when it parses, else text)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else text


def _range(field: str, text: str) -> Dimension:
    kind, *bounds = text.split(":")
    if len(bounds) != 2 or not all(b.strip() for b in bounds):
        raise _bad(field, text, f"is not a range ({kind}: needs exactly LOW:HIGH)")
    low = _bound(field, text, bounds[0], "LOW")
    high = _bound(field, text, bounds[1], "HIGH")
    if field in WHOLE_NUMBERS and kind == "float":
        raise SpaceError(
            f"space: {field}={text!r} draws floats, and {field} takes whole numbers; "
            "use int:LOW:HIGH, log:LOW:HIGH (whole numbers on a log scale) or A,B,C"
        )
    dimension = Dimension(field, kind, low=low, high=high)  # type: ignore[arg-type]
    if dimension.whole and not (low.is_integer() and high.is_integer()):
        counted = f" ({field} is a whole number)" if kind == "log" else ""
        raise _bad(field, text, f"needs whole numbers for {kind}:LOW:HIGH{counted}")
    if not low < high:
        raise _bad(field, text, f"needs LOW < HIGH (got {low:g} and {high:g})")
    if kind == "log" and low <= 0:
        raise _bad(field, text, "needs LOW > 0 for a log scale")
    return dimension


def _bound(field: str, text: str, bound: str, word: str) -> float:
    try:
        return float(bound)
    except ValueError:
        raise _bad(field, text, f"has {word} {bound!r}, not a number") from None


def _repeated(values: Sequence[Any]) -> list[Any]:
    """The values listed more than once, each as first listed. Compared by value, not by text: 1 and 1.0
    are one choice to the run (booleans, which 1 would equal, never reach a space's choices)."""
    firsts = [value for index, value in enumerate(values) if values.index(value) == index]
    return [value for value in firsts if values.count(value) > 1]


def _choices(field: str, original: object, values: Sequence[Any]) -> Dimension:
    if len(values) < 2:
        raise _bad(field, original, "lists fewer than two values (a fixed value is a plain option, not a search)")
    if repeated := _repeated(values):
        # Two equal choices would be two trials of one run, and weigh that value twice in the sampler.
        raise _bad(field, original, f"lists {', '.join(map(repr, repeated))} more than once")
    return Dimension(field, "choice", choices=tuple(values))


def _takes_numbers(field: str) -> bool:
    """A field declared as a number (epochs, batch_size, learning_rate, seed), not a word."""
    annotation = RunParameters.model_fields[field].annotation
    return any(kind in (int, float) for kind in (annotation, *typing.get_args(annotation)))


def parse_dimension(field: str, spec: object) -> Dimension:
    """One field's SPEC (text, or a list of values from a YAML/JSON file) as a Dimension."""
    if field not in SEARCHABLE:
        raise SpaceError(f"space: cannot vary {field!r}{did_you_mean(field, SEARCHABLE)}; tunable fields: {', '.join(SEARCHABLE)}")
    if isinstance(spec, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple, bool)) or v is None for v in spec):
            raise _bad(field, spec, "lists something other than numbers and words")
        # A file's quoted "1e-3" is text, which the run would parse as a number: refused, as --space refuses
        # a word for a number, rather than searched as a string (stored and ranked as text).
        if _takes_numbers(field) and (word := next((v for v in spec if isinstance(v, str)), None)) is not None:
            raise _bad(field, spec, f"lists {word!r}, not a number")
        return _choices(field, spec, list(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(field, spec, "is not a search range")
    text = spec.strip()
    if text.split(":")[0] in ("log", "int", "float"):
        return _range(field, text)
    if ":" in text.split(",")[0] and "," not in text:
        raise _bad(field, text, f"has an unknown range kind {text.split(':')[0]!r}")
    return _choices(field, text, [_choice_value(part.strip()) for part in text.split(",") if part.strip()])


def parse_space(space: Mapping[str, object]) -> SearchSpace:
    """Every field's SPEC as a SearchSpace; an empty space or a bad SPEC is one SpaceError."""
    if not space:
        raise SpaceError(f"space: give at least one field to vary (FIELD={FORMS}); tunable fields: {', '.join(SEARCHABLE)}")
    return SearchSpace(tuple(parse_dimension(str(field), spec) for field, spec in sorted(space.items())))


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """Command-line ``FIELD=SPEC`` items as a mapping; a field given twice is refused (the first would
    be dropped without a word)."""
    parsed: dict[str, str] = {}
    for item in items:
        field, sep, spec = item.partition("=")
        if not sep or not field.strip() or not spec.strip():
            raise SpaceError(f"--space takes FIELD=SPEC with SPEC one of {FORMS}; got {item!r}")
        if field.strip() in parsed:
            raise SpaceError(f"--space gives {field.strip()} twice; give it one SPEC ({FORMS})")
        parsed[field.strip()] = spec.strip()
    return parsed


# YAML 1.2's floats (its core schema): PyYAML follows YAML 1.1, where a float needs a dot, so 1e-3 was the
# string '1e-3' (and so in a JSON file, read as YAML). Whole numbers stay with the int resolver.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _DuplicateKey(ValueError):
    """A mapping in a space file that gives one key twice (a YAML loader would keep the last silently)."""

    def __init__(self, key: object, first_line: int, line: int) -> None:
        self.key = key
        self.where = f"line {line}" if line == first_line else f"lines {first_line} and {line}"  # one-line JSON
        super().__init__(f"{key} twice ({self.where})")


@functools.cache  # one class per process; yaml is imported on first use only
def _space_loader() -> type:
    """A SafeLoader whose floats are YAML 1.2's and whose mappings refuse a key given twice."""
    import yaml

    class SpaceLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:  # before merge keys (<<) are flattened: an override is no duplicate
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in lines:
                    raise _DuplicateKey(key, lines[key], line)
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    SpaceLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    SpaceLoader.add_implicit_resolver(_FLOAT_TAG, _YAML12_FLOAT, list("-+0123456789."))
    return SpaceLoader


def load_space_file(path: Path) -> dict[str, object]:
    """A YAML or JSON file holding a mapping of FIELD to SPEC (text, or a list of values)."""
    import yaml

    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_space_loader())  # JSON is YAML too
    except OSError as error:
        raise SpaceError(f"space file {path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise SpaceError(f"space file {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); save it as UTF-8") from None
    except _DuplicateKey as twice:
        raise SpaceError(
            f"space file {path}: gives {twice.key} twice ({twice.where}); give it one SPEC ({FORMS})"
        ) from None
    except yaml.YAMLError as error:
        raise SpaceError(f"space file {path}: not YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise SpaceError(f"space file {path}: needs a mapping of FIELD to SPEC ({FORMS}), got {type(loaded).__name__}")
    return {str(field): spec for field, spec in loaded.items()}
