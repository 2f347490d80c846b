"""Find backends by name through the ``cnn_train.backends`` entry-point group.

Like pluggy and fsspec, the registry keeps what it loaded: the entry points are read once per
process, and each backend class is imported and checked against the contract once, on first use.
Listing reads package metadata only, so it imports neither torch nor keras. The project's own
backends are found exactly like a third party's: through their distribution's entry points.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import inspect
import re
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from packaging.requirements import InvalidRequirement, Requirement

from cnn_train.plugins.config import ARCHITECTURES
from cnn_train.plugins.contract import CONTRACT_METHODS, Backend

GROUP = "cnn_train.backends"


class BackendError(Exception):
    """Base class for every problem finding or loading a backend."""


class UnknownBackendError(BackendError, LookupError):
    """No installed distribution registers that name."""


class BackendDependencyError(BackendError, ImportError):
    """The backend's module imports something that is not installed."""


class BackendConflictError(BackendError):
    """Two distributions register the same backend name."""


class BackendContractError(BackendError, TypeError):
    """The loaded object does not satisfy the Backend contract."""


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend, as package metadata describes it (nothing imported)."""

    name: str
    distribution: str
    version: str
    #: The entry point's ``module:attribute``.
    target: str
    #: Distributions the backend's distribution always depends on (its ``Requires-Dist`` outside extras).
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Registration:
    info: BackendInfo
    entry: importlib.metadata.EntryPoint


def _info(entry: importlib.metadata.EntryPoint) -> BackendInfo:
    dist = entry.dist
    if dist is None:
        return BackendInfo(entry.name, "unknown", "unknown", entry.value)
    name = dist.metadata["Name"] or "unknown"
    return BackendInfo(entry.name, name, dist.version or "unknown", entry.value, _dependencies(dist))


def _dependencies(dist: importlib.metadata.Distribution) -> tuple[str, ...]:
    """Names of the distributions ``dist`` requires whatever extras are chosen, in declared order."""
    names: list[str] = []
    for line in dist.requires or ():
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # a malformed line in someone's metadata must not break listing
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return tuple(dict.fromkeys(names))


@functools.cache
def _registrations() -> Mapping[str, tuple[_Registration, ...]]:
    """Every registered name with the distributions registering it (one each, unless they conflict)."""
    found: dict[str, list[_Registration]] = {}
    for entry in importlib.metadata.entry_points(group=GROUP):
        registration = _Registration(_info(entry), entry)
        seen = found.setdefault(entry.name, [])
        # The same distribution can be visible twice (e.g. an editable install and a build dir).
        if all(known.info != registration.info for known in seen):
            seen.append(registration)
    return MappingProxyType({name: tuple(found[name]) for name in sorted(found)})


_loaded: dict[str, type[Backend]] = {}


def refresh() -> None:
    """Forget the entry points read and the classes loaded, so the next call reads package metadata again."""
    _registrations.cache_clear()
    _loaded.clear()


def installed_backends() -> list[BackendInfo]:
    """Every registered backend, sorted by name, from package metadata only: no backend is imported."""
    return [registration.info for registrations in _registrations().values() for registration in registrations]


def _registration(name: str) -> _Registration:
    registered = _registrations()
    if name not in registered:
        installed = ", ".join(registered) or "none (is cnn-train installed?)"
        close = difflib.get_close_matches(name, registered, n=1)
        raise UnknownBackendError(
            f"unknown backend {name!r}{f' (did you mean {close[0]}?)' if close else ''}; installed backends: {installed}. "
            f"Backends register under the entry-point group {GROUP!r}."
        )
    candidates = registered[name]
    if len({(c.info.distribution, c.info.target) for c in candidates}) > 1:
        owners = " and ".join(f"{c.info.distribution} {c.info.version} ({c.info.target})" for c in candidates)
        raise BackendConflictError(f"backend name {name!r} is registered by both {owners}; uninstall one of them")
    return candidates[0]


def backend_info(name: str) -> BackendInfo:
    """Metadata of backend ``name``; raises when it is unknown or registered twice."""
    return _registration(name).info


def _import_target(registration: _Registration) -> object:
    info = registration.info
    try:
        return registration.entry.load()
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        own_module = info.target.partition(":")[0]
        if own_module == missing or own_module.startswith(missing + "."):
            raise BackendError(
                f"backend {info.name!r} (from {info.distribution} {info.version}) points at {info.target}, "
                f"but module {missing!r} does not exist; reinstall {info.distribution} or fix its entry point"
            ) from error
        package = missing.partition(".")[0]
        if package != missing and importlib.util.find_spec(package) is not None:  # a typo, not a missing install
            raise BackendError(
                f"backend {info.name!r} (from {info.distribution} {info.version}) failed to import: "
                f"{_import_line(error)}imports module {missing!r}, which does not exist (package {package!r} "
                "is installed but has no such module)"
            ) from error
        raise BackendDependencyError(
            f"backend {info.name!r} (from {info.distribution} {info.version}) {_import_line(error)}imports module "
            f"{package!r}, which is not installed; {_install_hint(info, package)}"
        ) from error
    except Exception as error:
        where = _import_line(error).strip()
        raise BackendError(
            f"backend {info.name!r} (from {info.distribution} {info.version}, {info.target}) "
            f"failed to import: {type(error).__name__}: {error}" + (f" (raised at {where})" if where else "")
        ) from error


def _install_hint(info: BackendInfo, module: str) -> str:
    """``pip install`` of what the backend's distribution requires and is missing; a module's import name is
    no pip name to guess from (``cv2`` comes from opencv-python, ``skimage`` from scikit-image)."""
    missing = [name for name in info.requires if not _installed(name)]
    if missing:
        return f"{info.distribution} requires {', '.join(missing)}: pip install {' '.join(missing)}"
    return f"install the distribution that provides module {module!r} (its pip name may differ)"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _import_line(error: BaseException) -> str:
    """``package/file.py:LINE `` of the import statement that failed (the last frame outside importlib), or ''."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<frozen")]
    if not frames:
        return ""
    file = Path(frames[-1].filename)
    return f"{file.parent.name}/{file.name}:{frames[-1].lineno} "


#: A backend's name becomes part of file names (``confusion_matrix_<name>.png``), task run names and MLflow
#: params, so it is kept to what is safe in all three.
_USABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``, imported and checked against the contract the first time it is asked for."""
    if name not in _loaded:
        registration = _registration(name)
        if not _USABLE_NAME.fullmatch(name):
            info = registration.info
            raise BackendContractError(
                f"backend name {name!r} (from {info.distribution} {info.version}) is not usable: a name is letters, "
                "digits, '.', '_' and '-', starting with a letter or digit (it names files, tasks and MLflow params); "
                f"rename its entry point in the group {GROUP!r}"
            )
        loaded = _import_target(registration)
        validate_backend_class(loaded, name=name)
        _loaded[name] = loaded  # type: ignore[assignment]  # validated just above
    return _loaded[name]


def load_backend(name: str) -> Backend:
    """A new, unbuilt instance of backend ``name``."""
    cls = load_backend_class(name)
    try:
        return cls()
    except Exception as error:
        raise BackendError(
            f"backend {name!r} raised while being constructed ({type(error).__name__}: {error}); "
            "backends must be constructible with no arguments and do no work until build()"
        ) from error


def mlflow_has_flavor(name: str) -> bool:
    """Whether ``mlflow.<name>`` exists, found on disk: importing MLflow to ask would cost every load a second.
    Without MLflow installed nothing is judged (True)."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None:
        return True
    folders = [Path(folder) for folder in (spec.submodule_search_locations or [])]
    return name.isidentifier() and any((f / name).is_dir() or (f / f"{name}.py").is_file() for f in folders)


def _attribute_problems(cls: type) -> list[str]:
    problems = []
    flavor = getattr(cls, "mlflow_flavor", None)
    if not isinstance(flavor, str) or not flavor:
        problems.append(
            f"class attribute 'mlflow_flavor' must name an MLflow flavor module, e.g. 'pytorch', or be 'pyfunc'; got {flavor!r}"
        )
    elif flavor != "pyfunc" and not mlflow_has_flavor(flavor):
        # Else the run trained in full and failed only when it logged the model.
        problems.append(
            f"mlflow_flavor {flavor!r} is no MLflow flavor (there is no mlflow.{flavor}); name one, e.g. 'pytorch', "
            "'keras' or 'sklearn', or use 'pyfunc' for a framework MLflow has no flavor for"
        )
    architectures = getattr(cls, "architectures", None)
    if not isinstance(architectures, tuple) or not architectures or not all(isinstance(a, str) for a in architectures):
        comma = " (a string: a tuple of one needs its comma, ('cnn',))" if isinstance(architectures, str) else ""
        problems.append(
            "class attribute 'architectures' must be a non-empty tuple of architecture names, e.g. ('cnn', 'dense'); "
            f"got {architectures!r}{comma}"
        )
    elif unknown := [name for name in architectures if name not in ARCHITECTURES]:
        # Else it loaded, and failed only when a check or a run built one, on ModelConfig's validation error.
        problems.append(
            f"class attribute 'architectures' names {', '.join(map(repr, unknown))}, which ModelConfig cannot describe; "
            f"the architectures are {', '.join(ARCHITECTURES)}"
        )
    return problems


def _signature_problems(method_name: str, actual: Mapping[str, inspect.Parameter]) -> list[str]:
    """What keeps ``actual`` parameters from accepting every call the contract's method allows."""
    wanted = list(inspect.signature(getattr(Backend, method_name)).parameters.values())[1:]  # drop self
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in actual.values())
    problems = []
    for parameter in wanted:
        got = actual.get(parameter.name)
        if got is None:
            if not (accepts_kwargs and parameter.kind is parameter.KEYWORD_ONLY):
                problems.append(f"{method_name}(): missing parameter {parameter.name!r}")
        elif parameter.kind is parameter.KEYWORD_ONLY and got.kind not in (got.KEYWORD_ONLY, got.POSITIONAL_OR_KEYWORD):
            problems.append(f"{method_name}(): parameter {parameter.name!r} must accept a keyword")
    wanted_names = {p.name for p in wanted} | {"self"}
    for extra in actual.values():
        required = extra.default is inspect.Parameter.empty and extra.kind not in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD)
        if extra.name not in wanted_names and required:
            problems.append(f"{method_name}(): extra parameter {extra.name!r} needs a default")
    return problems


def _constructor_problems(cls: type) -> list[str]:
    """A backend is made with ``cls()``: an ``__init__`` that needs arguments fails every run and check."""
    try:
        inspect.signature(cls).bind()
    except TypeError as error:
        return [f"the class must construct with no arguments, and do its work in build() ({error})"]
    except ValueError:  # pragma: no cover - a class without a signature (a C type) cannot be judged
        return []
    return []


def _method_problems(cls: type) -> list[str]:
    problems = []
    for method_name in CONTRACT_METHODS:
        method = getattr(cls, method_name, None)
        if method is None or not callable(method):
            problems.append(f"method {method_name}() is missing")
            continue
        try:
            actual = inspect.signature(method).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            continue
        problems.extend(_signature_problems(method_name, actual))
    return problems


def validate_backend_class(cls: object, *, name: str = "?") -> None:
    """Refuse ``cls`` unless it has every contract member with compatible parameters.

    The message names the backend, the member and what is wrong, so a plugin author can fix it.
    """
    if not inspect.isclass(cls):
        raise BackendContractError(
            f"backend {name!r} must be a class implementing cnn_train.plugins.contract.Backend, "
            f"got {type(cls).__name__}"
        )
    problems = _attribute_problems(cls) + _constructor_problems(cls) + _method_problems(cls)
    if problems:
        raise BackendContractError(
            f"backend {name!r} ({cls.__module__}.{cls.__qualname__}) "
            "does not satisfy the Backend contract: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class BackendStatus:
    """A backend as ``cnn-train backends --check`` shows it: metadata plus whether it loads."""

    info: BackendInfo
    loads: bool
    #: Why it does not load, with the plugin's own traceback as its cause (``cnn-train --debug`` shows it).
    error: BackendError | None = field(default=None, compare=False, repr=False)

    @property
    def problem(self) -> str:
        """Why it does not load, in one line ("" when it loads)."""
        return "" if self.error is None else str(self.error)


def backend_statuses() -> list[BackendStatus]:
    """Every registered backend, loaded one by one; a broken one warns and the others stay usable."""
    statuses = []
    for name, registrations in _registrations().items():
        try:
            load_backend_class(name)
        except BackendError as error:
            warnings.warn(f"cnn-train: {error}", RuntimeWarning, stacklevel=2)
            statuses.append(BackendStatus(registrations[0].info, False, error))
        else:
            statuses.append(BackendStatus(registrations[0].info, True))
    return statuses
