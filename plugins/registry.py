"""Find backends by name through the ``cnn_train.backends`` entry-point group.

Listing reads package metadata only, so it imports neither torch nor keras; a backend's module
is imported the first time it is loaded. The project's own backends are found exactly like a
third party's: through their distribution's entry points.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

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
    target: str
    distribution: str
    version: str


def _distribution(entry: EntryPoint) -> tuple[str, str]:
    dist = entry.dist
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def _entries() -> Iterable[EntryPoint]:
    return entry_points(group=GROUP)


def discover() -> dict[str, list[BackendInfo]]:
    """Every registered name with the distributions registering it (one each, unless they conflict)."""
    found: dict[str, list[BackendInfo]] = {}
    for entry in _entries():
        dist_name, version = _distribution(entry)
        info = BackendInfo(entry.name, entry.value, dist_name, version)
        # The same distribution can be visible twice (e.g. an editable install and a build dir).
        if info not in found.setdefault(entry.name, []):
            found[entry.name].append(info)
    return dict(sorted(found.items()))


def available_backends() -> list[str]:
    """Sorted names of the installed backends."""
    return list(discover())


def backend_info(name: str) -> BackendInfo:
    """Metadata of backend ``name``; raises when it is unknown or registered twice."""
    registered = discover()
    if name not in registered:
        installed = ", ".join(registered) or "none (is cnn-train installed?)"
        raise UnknownBackendError(
            f"unknown backend {name!r}; installed backends: {installed}. "
            f"Backends register under the entry-point group {GROUP!r}."
        )
    infos = registered[name]
    if len({(i.distribution, i.target) for i in infos}) > 1:
        owners = " and ".join(f"{i.distribution} {i.version} ({i.target})" for i in infos)
        raise BackendConflictError(
            f"backend name {name!r} is registered by both {owners}; uninstall one of them"
        )
    return infos[0]


def _entry_for(info: BackendInfo) -> EntryPoint:
    for entry in _entries():
        if entry.name == info.name and entry.value == info.target:
            return entry
    raise UnknownBackendError(f"backend {info.name!r} disappeared while loading")  # pragma: no cover


def load_backend_class(name: str) -> type[Backend]:
    """Import backend ``name`` and check it against the contract before anyone uses it."""
    info = backend_info(name)
    try:
        loaded = _entry_for(info).load()
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        own_module = info.target.partition(":")[0]
        if own_module == missing or own_module.startswith(missing + "."):
            raise BackendError(
                f"backend {name!r} (from {info.distribution} {info.version}) points at {info.target}, "
                f"but module {missing!r} does not exist; reinstall {info.distribution} or fix its entry point"
            ) from error
        raise BackendDependencyError(
            f"backend {name!r} (from {info.distribution} {info.version}) needs the package "
            f"{missing!r}, which is not installed: pip install {missing.split('.')[0]}"
        ) from error
    except Exception as error:
        raise BackendError(
            f"backend {name!r} (from {info.distribution} {info.version}, {info.target}) "
            f"failed to import: {type(error).__name__}: {error}"
        ) from error
    validate_backend_class(loaded, name=name)
    return loaded


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


def _required_parameters(method_name: str) -> list[inspect.Parameter]:
    params = list(inspect.signature(getattr(Backend, method_name)).parameters.values())
    return params[1:]  # drop self


def validate_backend_class(cls: object, *, name: str = "?") -> None:
    """Refuse ``cls`` unless it has every contract member with compatible parameters.

    The message names the backend, the member and what is wrong, so a plugin author can fix it.
    """
    if not inspect.isclass(cls):
        raise BackendContractError(
            f"backend {name!r} must be a class implementing cnn_train.plugins.contract.Backend, "
            f"got {type(cls).__name__}"
        )
    problems: list[str] = []
    flavor = getattr(cls, "mlflow_flavor", None)
    if not isinstance(flavor, str) or not flavor:
        problems.append("class attribute 'mlflow_flavor' must name an MLflow flavor module, e.g. 'pytorch'")
    architectures = getattr(cls, "architectures", None)
    if not isinstance(architectures, tuple) or not architectures or not all(isinstance(a, str) for a in architectures):
        problems.append("class attribute 'architectures' must be a non-empty tuple of architecture names, e.g. ('cnn', 'dense')")
    for method_name in CONTRACT_METHODS:
        method = getattr(cls, method_name, None)
        if method is None or not callable(method):
            problems.append(f"method {method_name}() is missing")
            continue
        try:
            actual = inspect.signature(method).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            continue
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in actual.values())
        for wanted in _required_parameters(method_name):
            if wanted.name in actual:
                got = actual[wanted.name]
                if wanted.kind is wanted.KEYWORD_ONLY and got.kind not in (got.KEYWORD_ONLY, got.POSITIONAL_OR_KEYWORD):
                    problems.append(f"{method_name}(): parameter {wanted.name!r} must accept a keyword")
            elif not (accepts_kwargs and wanted.kind is wanted.KEYWORD_ONLY):
                problems.append(f"{method_name}(): missing parameter {wanted.name!r}")
        wanted_names = {p.name for p in _required_parameters(method_name)}
        for extra in actual.values():
            if extra.name in wanted_names or extra.name == "self":
                continue
            if extra.default is inspect.Parameter.empty and extra.kind not in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD):
                problems.append(f"{method_name}(): extra parameter {extra.name!r} needs a default")
    if problems:
        raise BackendContractError(
            f"backend {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', '?')}) "
            "does not satisfy the Backend contract: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class BackendStatus:
    """A backend as ``cnn-train backends`` shows it: metadata plus whether it loads."""

    info: BackendInfo
    loads: bool
    problem: str = ""


def backend_statuses() -> list[BackendStatus]:
    """Every registered backend, loaded one by one; a broken one warns and the others stay usable."""
    statuses = []
    for name, infos in discover().items():
        try:
            load_backend_class(name)
        except BackendError as error:
            warnings.warn(f"cnn-train: {error}", RuntimeWarning, stacklevel=2)
            statuses.append(BackendStatus(infos[0], False, str(error)))
        else:
            statuses.append(BackendStatus(infos[0], True))
    return statuses
