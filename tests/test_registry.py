"""Discovery through entry points: laziness, actionable errors, contract enforcement."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from cnn_train.plugins import registry
from cnn_train.plugins.contract import CONTRACT_METHODS


class _Dist:
    """Just enough of importlib.metadata.Distribution for registry's needs."""

    def __init__(self, name: str, version: str = "1.0") -> None:
        self.metadata = {"Name": name}
        self.version = version


def _entry(name: str, target: str, dist: str) -> EntryPoint:
    entry = EntryPoint(name=name, value=target, group=registry.GROUP)
    return entry._for(_Dist(dist))  # the same call importlib.metadata uses to attach a distribution


@pytest.fixture
def fake_entries(monkeypatch):
    """Replace the installed entry points with the ones a test lists."""

    def install(*entries: EntryPoint) -> None:
        monkeypatch.setattr(registry, "_entries", lambda: list(entries))

    return install


GOOD = "tests.plugin_fixtures:GoodBackend"


def test_installed_distribution_registers_builtins():
    names = registry.available_backends()
    assert {"keras", "torch"} <= set(names)
    info = registry.backend_info("torch")
    assert info.distribution == "cnn-train"
    assert info.target == "cnn_train.backends.torch_backend:TorchBackend"


def test_listing_imports_no_framework():
    code = textwrap.dedent(
        """
        import json, sys
        from cnn_train.plugins import registry
        names = registry.available_backends()
        print(json.dumps({"names": names, "loaded": [m for m in ("torch", "keras") if m in sys.modules]}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert {"keras", "torch"} <= set(result["names"])
    assert result["loaded"] == []


def test_cli_backends_imports_no_framework():
    code = (
        "import sys; from typer.testing import CliRunner; from cnn_train.flows.cli import app; "
        "from cnn_train.plugins import registry; registry.backend_statuses = lambda: []; "
        "CliRunner().invoke(app, ['backends']); print(sorted(m for m in ('torch','keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_lists_installed_ones():
    with pytest.raises(registry.UnknownBackendError) as caught:
        registry.load_backend("tensorflow")
    message = str(caught.value)
    assert "unknown backend 'tensorflow'" in message
    assert "installed backends: " in message
    assert "keras" in message and "torch" in message


def test_unknown_backend_with_nothing_installed(fake_entries):
    fake_entries()
    with pytest.raises(registry.UnknownBackendError, match="installed backends: none"):
        registry.backend_info("torch")


def test_missing_dependency_says_what_to_install(fake_entries):
    fake_entries(_entry("needs-jax", "tests.plugin_fixtures_needs_jax:Backend", "jax-plugin"))
    with pytest.raises(registry.BackendDependencyError) as caught:
        registry.load_backend("needs-jax")
    message = str(caught.value)
    assert "needs the package 'jax_not_installed_here'" in message
    assert "pip install jax_not_installed_here" in message


def test_missing_module_of_the_plugin_itself(fake_entries):
    fake_entries(_entry("ghost", "tests.no_such_module:Backend", "ghost-plugin"))
    with pytest.raises(registry.BackendError, match="module 'tests.no_such_module' does not exist"):
        registry.load_backend("ghost")


def test_broken_plugin_warns_and_others_stay_usable(fake_entries):
    fake_entries(
        _entry("good", GOOD, "good-plugin"),
        _entry("broken", "tests.plugin_fixtures:RaisesOnImport", "broken-plugin"),
    )
    with pytest.warns(RuntimeWarning, match="backend 'broken'"):
        statuses = {s.info.name: s for s in registry.backend_statuses()}
    assert statuses["good"].loads
    assert not statuses["broken"].loads
    assert "failed to import" in statuses["broken"].problem
    assert registry.load_backend("good").mlflow_flavor == "fake"


def test_two_distributions_registering_one_name(fake_entries):
    fake_entries(_entry("cnn", GOOD, "first-dist"), _entry("cnn", "tests.plugin_fixtures:Other", "second-dist"))
    with pytest.raises(registry.BackendConflictError) as caught:
        registry.load_backend("cnn")
    assert "first-dist" in str(caught.value) and "second-dist" in str(caught.value)


def test_same_distribution_seen_twice_is_not_a_conflict(fake_entries):
    fake_entries(_entry("good", GOOD, "good-plugin"), _entry("good", GOOD, "good-plugin"))
    assert registry.load_backend_class("good").__name__ == "GoodBackend"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("tests.plugin_fixtures:MissingTrain", "method train() is missing", id="missing-method"),
        pytest.param("tests.plugin_fixtures:WrongBuildSignature", "build(): missing parameter 'device'", id="missing-parameter"),
        pytest.param("tests.plugin_fixtures:NoFlavor", "'mlflow_flavor'", id="missing-flavor"),
        pytest.param("tests.plugin_fixtures:ExtraRequired", "evaluate(): extra parameter 'scale' needs a default", id="extra-required-parameter"),
        pytest.param("tests.plugin_fixtures:NOT_A_CLASS", "must be a class", id="not-a-class"),
    ],
)
def test_contract_breakers_are_refused_when_loaded(fake_entries, target, expected):
    fake_entries(_entry("bad", target, "bad-plugin"))
    with pytest.raises(registry.BackendContractError) as caught:
        registry.load_backend_class("bad")
    assert expected in str(caught.value)
    assert "'bad'" in str(caught.value)


def test_constructor_that_raises_is_reported(fake_entries):
    fake_entries(_entry("boom", "tests.plugin_fixtures:RaisesInConstructor", "boom-plugin"))
    with pytest.raises(registry.BackendError, match="raised while being constructed .*licence server"):
        registry.load_backend("boom")


def test_contract_lists_every_protocol_method():
    from cnn_train.plugins.contract import Backend

    declared = {name for name in vars(Backend) if not name.startswith("_") and callable(vars(Backend)[name])}
    assert declared == set(CONTRACT_METHODS)
