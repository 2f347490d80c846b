"""Discovery through entry points: listing from metadata alone, loading once, actionable errors,
contract enforcement, and the ``cnn-train backends`` command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnn_train.plugins import registry
from cnn_train.plugins.contract import CONTRACT_METHODS, Backend
from tests.plugin_fixtures import FakeDistribution, only_distributions, write_dist_info

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {
    "keras": "cnn_train.backends.keras_backend:KerasBackend",
    "torch": "cnn_train.backends.torch_backend:TorchBackend",
}
GOOD = "tests.plugin_fixtures:GoodBackend"


@pytest.fixture
def installed(monkeypatch):
    """Make the distributions a test lists the only installed ones; the registry forgets them afterwards."""
    yield lambda *distributions: only_distributions(monkeypatch, *distributions)
    registry.refresh()


def _plugin(name: str, target: str) -> FakeDistribution:
    return FakeDistribution(f"{name}-plugin", {name: target})


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_are_listed_from_their_distribution(name):
    info = {info.name: info for info in registry.installed_backends()}[name]
    assert (info.name, info.distribution, info.version, info.target) == (
        name, "cnn-train", importlib.metadata.version("cnn-train"), BUILTINS[name]
    )
    assert {"torch", "keras", "mlflow"} <= set(info.requires)


def test_a_backend_declares_its_framework_through_its_requirements(installed):
    installed(FakeDistribution("jax-plugin", {"flax": GOOD}, requires=(
        "cnn-train", "jax[cpu]>=0.4", "flax; python_version >= '3.9'", "pytest; extra == 'test'",
        "jax>=0.4", "not a requirement !!",
    )))
    assert registry.backend_info("flax").requires == ("cnn-train", "jax", "flax")


def test_listing_imports_nothing_even_for_broken_plugins(installed):
    installed(
        _plugin("needs-jax", "tests.plugin_fixtures_needs_jax:Backend"),
        _plugin("ghost", "tests.no_such_module:Backend"),
    )
    assert [info.name for info in registry.installed_backends()] == ["ghost", "needs-jax"]
    assert registry.backend_info("ghost").distribution == "ghost-plugin"
    assert "tests.plugin_fixtures_needs_jax" not in sys.modules


def test_listing_imports_no_framework():
    code = textwrap.dedent(
        """
        import json, sys
        from cnn_train.plugins import registry
        names = [info.name for info in registry.installed_backends()]
        print(json.dumps({"names": names, "loaded": [m for m in ("torch", "keras") if m in sys.modules]}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert set(BUILTINS) <= set(result["names"])
    assert result["loaded"] == []


def test_entry_points_are_read_once_and_each_class_loaded_once(installed, monkeypatch):
    reads = installed(_plugin("good", GOOD), _plugin("other", "tests.plugin_fixtures:Other"))
    loads: list[str] = []
    load = importlib.metadata.EntryPoint.load

    def counted_load(entry):
        loads.append(entry.name)
        return load(entry)

    monkeypatch.setattr(importlib.metadata.EntryPoint, "load", counted_load)
    first = registry.load_backend_class("good")
    registry.installed_backends()
    registry.backend_info("other")
    registry.load_backend("good")
    assert registry.load_backend_class("good") is first
    assert [status.loads for status in registry.backend_statuses()] == [True, True]
    assert (reads, loads) == ([{"group": registry.GROUP}], ["good", "other"])
    registry.refresh()
    registry.load_backend_class("good")
    assert (len(reads), loads) == (2, ["good", "other", "good"])


def test_unknown_backend_lists_installed_ones():
    with pytest.raises(registry.UnknownBackendError) as caught:
        registry.load_backend("tensorflow")
    message = str(caught.value)
    assert message.startswith("unknown backend 'tensorflow'; installed backends: ")
    assert all(name in message for name in BUILTINS)


def test_unknown_backend_with_nothing_installed(installed):
    installed()
    with pytest.raises(registry.UnknownBackendError, match="installed backends: none"):
        registry.backend_info("torch")


@pytest.mark.parametrize(
    ("target", "error", "expected"),
    [
        pytest.param(
            "tests.plugin_fixtures_needs_jax:Backend",
            registry.BackendDependencyError,
            "tests/plugin_fixtures_needs_jax.py:3 imports module 'jax_not_installed_here', which is not installed; "
            "install the distribution that provides module 'jax_not_installed_here' (its pip name may differ)",
            id="missing-dependency",
        ),
        pytest.param(
            "tests.no_such_module:Backend",
            registry.BackendError,
            "points at tests.no_such_module:Backend, but module 'tests.no_such_module' does not exist",
            id="missing-plugin-module",
        ),
        pytest.param(
            "tests.plugin_fixtures:RaisesOnImport",
            registry.BackendError,
            "failed to import: RuntimeError: plugin is broken at import time (raised at tests/plugin_fixtures.py:",
            id="raises-on-import",
        ),
        pytest.param(
            "tests.plugin_fixtures:RaisesInConstructor",
            registry.BackendError,
            "raised while being constructed (ConnectionError: cannot reach the licence server)",
            id="raises-in-constructor",
        ),
    ],
)
def test_load_failures_say_what_to_do(installed, target, error, expected):
    installed(_plugin("bad", target))
    with pytest.raises(error) as caught:
        registry.load_backend("bad")
    assert str(caught.value).startswith("backend 'bad' ")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("plugin", "line", "missing", "package"),
    [
        pytest.param("typo_pkg", "from typo_pkg.nett import Net", "typo_pkg.nett", "typo_pkg", id="a-typo-in-the-plugins-own-package"),
        pytest.param("other_pkg", "import mlflow.not_a_submodule", "mlflow.not_a_submodule", "mlflow", id="no-such-module-in-a-dependency"),
    ],
)
def test_a_module_missing_from_an_installed_package_is_no_advice_to_install_it(
    installed, tmp_path, monkeypatch, plugin, line, missing, package
):
    """It said "needs the package 'typo_pkg.nett', which is not installed: pip install typo_pkg", the plugin itself."""
    (tmp_path / plugin).mkdir()
    (tmp_path / plugin / "__init__.py").write_text("")
    (tmp_path / plugin / "backend.py").write_text(f"import os\n{line}\n\nclass Backend:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed(_plugin("bad", f"{plugin}.backend:Backend"))
    with pytest.raises(registry.BackendError) as caught:
        registry.load_backend("bad")
    assert not isinstance(caught.value, registry.BackendDependencyError)
    assert str(caught.value) == (
        f"backend 'bad' (from bad-plugin 1.0) failed to import: {plugin}/backend.py:2 imports module {missing!r}, "
        f"which does not exist (package {package!r} is installed but has no such module)"
    )


@pytest.mark.parametrize(
    ("requires", "hint"),
    [
        # An import name is no pip name: `import cv2` comes from opencv-python, `skimage` from scikit-image.
        pytest.param((), "install the distribution that provides module 'cv2' (its pip name may differ)",
                     id="nothing-declared"),
        pytest.param(("cnn-train", "opencv-python-not-here>=4", "numpy"),
                     "bad-plugin requires opencv-python-not-here: pip install opencv-python-not-here", id="declared"),
    ],
)
def test_a_missing_dependency_is_named_with_where_it_is_imported_and_what_to_install(
    installed, tmp_path, monkeypatch, requires, hint
):
    """It said "needs the package 'cv2', which is not installed: pip install cv2", a name pip does not know."""
    (tmp_path / "cv_plugin.py").write_text("import os\nimport cv2.dnn\n\nclass Backend:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed(FakeDistribution("bad-plugin", {"bad": "cv_plugin:Backend"}, requires=requires))
    with pytest.raises(registry.BackendDependencyError) as caught:
        registry.load_backend("bad")
    assert str(caught.value) == (
        f"backend 'bad' (from bad-plugin 1.0) {tmp_path.name}/cv_plugin.py:2 imports module 'cv2', which is not installed; {hint}"
    )


#: A plugin module's source, and what loading it says after "failed to import: " ({} is the file).
FAILING_IMPORTS = {
    "name-error": ("import os\nundefined_name + 1\n", "NameError: name 'undefined_name' is not defined (raised at {}:2)"),
    "raises": ("x = 1\n\nraise RuntimeError('no licence')\n", "RuntimeError: no licence (raised at {}:3)"),
}


@pytest.mark.parametrize(("code", "line"), FAILING_IMPORTS.values(), ids=FAILING_IMPORTS)
def test_a_plugin_that_fails_at_import_says_where(installed, tmp_path, monkeypatch, code, line):
    (tmp_path / "broken_plugin.py").write_text(code + "\nclass Backend:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed(_plugin("bad", "broken_plugin:Backend"))
    with pytest.raises(registry.BackendError) as caught:
        registry.load_backend("bad")
    where = f"{tmp_path.name}/broken_plugin.py"
    assert str(caught.value) == f"backend 'bad' (from bad-plugin 1.0, broken_plugin:Backend) failed to import: {line.format(where)}"


@pytest.mark.parametrize("name", ["bad name!", "a/b", "-dash", "ünïcode"], ids=["space-and-bang", "slash", "leading-dash", "non-ascii"])
def test_a_backend_name_that_cannot_name_a_file_is_refused(installed, name):
    """The name reaches file names (compare's confusion_matrix_<name>.png), task names and MLflow params."""
    installed(_plugin(name, GOOD), _plugin("good", GOOD))
    with pytest.raises(registry.BackendContractError) as caught:
        registry.load_backend_class(name)
    assert str(caught.value).startswith(f"backend name {name!r} (from {name}-plugin 1.0) is not usable: a name is letters")
    assert registry.load_backend_class("good").__name__ == "GoodBackend"


def test_a_misspelt_backend_gets_a_suggestion(installed):
    installed(_plugin("mynp", GOOD), _plugin("torch", GOOD))
    with pytest.raises(registry.UnknownBackendError) as caught:
        registry.load_backend("mnyp")
    assert str(caught.value).startswith("unknown backend 'mnyp' (did you mean mynp?); installed backends: mynp, torch.")


def test_broken_plugin_warns_and_others_stay_usable(installed):
    installed(_plugin("good", GOOD), _plugin("broken", "tests.plugin_fixtures:RaisesOnImport"))
    with pytest.warns(RuntimeWarning, match="backend 'broken'"):
        statuses = {status.info.name: status for status in registry.backend_statuses()}
    assert statuses["good"] == registry.BackendStatus(registry.backend_info("good"), True)
    assert not statuses["broken"].loads
    assert "failed to import" in statuses["broken"].problem
    assert registry.load_backend("good").mlflow_flavor == "pyfunc"


def test_two_distributions_registering_one_name(installed):
    installed(
        FakeDistribution("first-dist", {"cnn": GOOD}),
        FakeDistribution("second-dist", {"cnn": "tests.plugin_fixtures:Other"}),
    )
    with pytest.raises(registry.BackendConflictError) as caught:
        registry.load_backend("cnn")
    assert "registered by both first-dist 1.0 (tests.plugin_fixtures:GoodBackend) and second-dist 1.0" in str(caught.value)


def test_same_distribution_seen_twice_is_not_a_conflict(installed):
    installed(_plugin("good", GOOD), _plugin("good", GOOD))
    assert [info.name for info in registry.installed_backends()] == ["good"]
    assert registry.load_backend_class("good").__name__ == "GoodBackend"


#: Each contract breaker in tests/plugin_fixtures.py, and what refusing it says.
CONTRACT_BREAKERS = {
    "MissingTrain": "method train() is missing",
    "WrongBuildSignature": "build(): missing parameter 'device'",
    "NoFlavor": "'mlflow_flavor'",
    "NotAFlavor": "mlflow_flavor 'numpy' is no MLflow flavor (there is no mlflow.numpy)",
    "NeedsAnArgument": "the class must construct with no arguments, and do its work in build() "
    "(missing a required argument: 'scale')",
    "UnknownArchitecture": "class attribute 'architectures' names 'linear', which ModelConfig cannot describe; "
    "the architectures are cnn, dense, cnn-improved",
    "ExtraRequired": "evaluate(): extra parameter 'scale' needs a default",
    "NOT_A_CLASS": "must be a class",
}


@pytest.mark.parametrize("breaker", CONTRACT_BREAKERS)
def test_contract_breakers_are_refused_when_loaded(installed, breaker):
    installed(_plugin("bad", f"tests.plugin_fixtures:{breaker}"))
    with pytest.raises(registry.BackendContractError) as caught:
        registry.load_backend_class("bad")
    assert CONTRACT_BREAKERS[breaker] in str(caught.value)
    assert "'bad'" in str(caught.value)


def test_contract_lists_every_protocol_method():
    declared = {name for name in vars(Backend) if not name.startswith("_") and callable(vars(Backend)[name])}
    assert declared == set(CONTRACT_METHODS)


# --- the `cnn-train backends` command -------------------------------------------------------------


def test_backends_command_lists_without_importing_a_framework():
    code = textwrap.dedent(
        """
        import json, sys
        from cnn_train.flows.cli import app
        app(["backends"], standalone_mode=False)
        print(json.dumps({framework: framework in sys.modules for framework in ("torch", "keras")}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    *listing, imported = result.stdout.splitlines()
    assert json.loads(imported) == {"torch": False, "keras": False}
    for name, target in BUILTINS.items():
        assert any(line.split()[0] == name and target in line for line in listing), result.stdout


def test_backends_check_command_reports_whether_each_loads(tmp_path):
    # A real distribution on the path whose backend fails to import: shown BROKEN, the others still load.
    write_dist_info(tmp_path, "broken-plugin", "0.1", {registry.GROUP: {"broken": "tests.plugin_fixtures:RaisesOnImport"}})
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    cli = Path(sys.executable).with_name("cnn-train")
    result = subprocess.run([str(cli), "backends", "--check"], capture_output=True, text=True, env=env, timeout=600)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in BUILTINS:
        assert lines[name].endswith("loads"), result.stdout
    assert "broken-plugin 0.1" in lines["broken"]
    assert "BROKEN: backend 'broken'" in lines["broken"] and "failed to import" in lines["broken"]
    assert result.returncode == 1
    assert result.stderr == "cnn-train: 1 backend(s) do not load: broken (why: above); the others are usable\n"


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_backends_check_shows_the_plugins_traceback_only_with_debug(installed, tmp_path, monkeypatch, debug):
    """`cnn-train --debug backends --check` printed the one line only: nothing showed where the plugin broke."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app
    from cnn_train.flows.errors import DEBUG_ENV

    (tmp_path / "broken_plugin.py").write_text("import os\nundefined_name + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed(_plugin("broken", "broken_plugin:Backend"), _plugin("good", GOOD))
    monkeypatch.setenv(DEBUG_ENV, "1" if debug else "")
    result = CliRunner().invoke(app, ["backends", "--check"])
    assert result.exit_code == 1
    assert "BROKEN: backend 'broken'" in result.stdout and "(raised at " in result.stdout
    shown = "Traceback (most recent call last)" in result.stderr
    assert shown == debug, result.stderr
    if debug:
        assert 'broken_plugin.py", line 2, in <module>' in result.stderr
