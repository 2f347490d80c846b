"""The typer application every command registers on, and the helpers commands share."""

from __future__ import annotations

import atexit
import gc
import inspect
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, Union, get_args, get_origin

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException
from pydantic import BaseModel

from cnn_train.flows.errors import DEBUG_ENV, ExpectedFailure, close_names, debugging


class _WholeSummaries(TyperGroup):
    """Click's plain help, listing each command with its whole first sentence, wrapped to the terminal
    (Click cuts it at the width left beside the names: "List installed backends from package metadata (no...")."""

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:  # Click's HelpFormatter, as typer vendors it
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, command.get_short_help_str(limit=10_000)) for name, command in commands if command and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _OneLineFailures(typer.Typer):
    """The application: an expected failure from any command is its one line on stderr and exit code 1;
    a bug keeps its traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not sys.argv[1:]:  # arguments from Python, or no arguments: the help
            return self._run(*args, **kwargs)
        # Click itself prints a usage error (unknown option, bad value, missing argument) as four lines:
        # usage, a hint, a blank line, the error. Not standalone, it raises it, and it is one line here.
        try:
            result = self._run(standalone_mode=False)
        except TyperException as error:
            if error.exit_code != 2 or debugging():  # not a usage error
                error.show()
                sys.exit(error.exit_code)
            where = getattr(error, "ctx", None)
            if hasattr(error, "option_name") and where is not None:  # an unknown option (Click's NoSuchOption)
                error.possibilities = option_suggestions(error.option_name, where.command)
            # The typed values' checks speak pydantic ("Value error, 'foo' is not one of ...").
            message = choice_suggestion(error.format_message().rstrip(".").replace("Value error, ", ""))
            hint = f"; see `{where.command_path} --help`" if where is not None else ""
            print(f"cnn-train: {message}{hint}", file=sys.stderr)
            sys.exit(error.exit_code)
        except typer.Abort:
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        sys.exit(result if type(result) is int else 0)  # an int is typer.Exit's code, as standalone Click exits

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ExpectedFailure as error:
            if debugging():
                raise
            print(f"cnn-train: {error}", file=sys.stderr)
            sys.exit(1)


def option_suggestions(typed: str, command: Any) -> list[str]:
    """The options of ``command`` a mistyped ``typed`` may mean (:func:`errors.close_names`); never
    ``--help``, which Click offered for whatever resembled nothing else."""
    options = [
        name for param in command.params for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--") and name != "--help"
    ]
    return close_names(typed, options, separator="-")


#: A closed choice's refusal, as Click and the declaration's checks word it.
_NOT_ONE_OF = re.compile(r"'(?P<typed>[^']*)' is not one of (?P<choices>'[^']*'(?:, '[^']*')*)")


def choice_suggestion(message: str) -> str:
    """``message`` with the choice a refused value may mean (``--state fail``: "did you mean failed?")."""
    refused = _NOT_ONE_OF.search(message)
    if refused is None:
        return message
    choices = re.findall(r"'([^']*)'", refused["choices"])
    close = close_names(refused["typed"].lower(), choices, separator="-" if any("-" in c for c in choices) else "_")
    return message[: refused.end()] + (f" (did you mean {' or '.join(close)}?)" if close else "") + message[refused.end():]


# Python's last garbage collection walks every object torch, Keras, MLflow and Prefect made: about 3 s
# after the work was done on a 2-core machine. Registered on import, before any command registers its
# own exit handlers, it runs after them (servers stopped, logs flushed); every handler still runs, and
# the memory of the frozen objects goes back to the OS with the process.
atexit.register(gc.freeze)

app = _OneLineFailures(
    name="cnn-train",
    help="Train, evaluate and report the Fashion-MNIST CNN with pluggable backends, Prefect and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: rich's boxed table cut option names short in an 80-column terminal
    # ("--validation-fra…") and wraps each description into a narrow column.
    rich_markup_mode=None,
    cls=_WholeSummaries,
)


@app.callback()
def _before_every_command(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the libraries' own logs and warnings.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for expected failures too.")] = False,
) -> None:
    """Ctrl-C works; Prefect's files under the project's state directory, flow runs' heartbeats as often as
    the servers' zombie automation expects, and the libraries' known noise silenced, before any command
    imports Prefect or MLflow; stderr kept for failures; the servers' credentials."""
    from cnn_train.flows.ops.serve import interruptible
    from cnn_train.flows.settings import configure_process

    # Run in the background by a shell, this process starts with SIGINT ignored: `kill -INT` would do
    # nothing, and whatever it starts without a handler of its own would inherit that (exec resets a handler).
    interruptible()
    configure_process(verbose=verbose)
    _one_line_errors(debug=debug)
    _present_credentials()
    _check_server_variables(ctx.invoked_subcommand)


#: Commands that tell about a port variable naming another server than this project's running one themselves.
_SAY_WHERE_SERVERS_RUN = ("status", "down", "up")


def _check_server_variables(command: str | None) -> None:
    """Each command reads them sooner or later (some only for a link), and Prefect's first import refuses a
    malformed PREFECT_API_URL with a traceback: one line, at once. A port variable that names another server
    than this project's running one sent a `run` to another account's MLflow: refused too."""
    from cnn_train.flows.ops import services
    from cnn_train.flows.ops.addresses import api_url_problem

    services.check_port_variables()
    for server in (services.prefect_server, services.mlflow_server):
        if command not in _SAY_WHERE_SERVERS_RUN and (problem := server.moved()):
            fail(problem)
    if (url := os.environ.get("PREFECT_API_URL")) and (problem := api_url_problem("PREFECT_API_URL", url)):
        fail(problem, 1)


#: CLI spellings that differ from the flow parameter: one `--backend` per compared backend, one
#: `--ray-resource` per resource, and one `--no-prune` flag (not --no-prune/--no-no-prune).
_OPTION_NAMES = {"backends": "--backend", "no_prune": "--no-prune", "ray_resources": "--ray-resource"}
#: What one item of a repeatable option looks like, shown by --help where typer would print "<list[str]>".
_METAVARS = {"backends": "NAME", "grid": "FIELD=V1,V2", "space": "FIELD=SPEC", "ray_resources": "NAME=AMOUNT"}


def _one_line_errors(*, debug: bool) -> None:
    """Logs and progress on stdout, so stderr carries only what went wrong: one line per expected failure."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.stdout")
    # MLflow's own handler writes to stderr; without it, its warnings reach Prefect's console handler.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _present_credentials() -> None:
    from cnn_train.flows.ops import auth

    # Servers shared with credentials: this process's own Prefect and MLflow clients present them too.
    if credentials := auth.load_credentials():
        for name, value in credentials.client_environment().items():
            os.environ.setdefault(name, value)


def typed_path(kind: str | None = None) -> Callable[[str], Path]:
    """A path from the command line that refuses '' (Path('') is the current folder: `predict ''` classified
    the whole project) and, with ``kind`` 'file' or 'dir', an existing path of the other kind, in
    click.Path's words (a parser replaces click.Path's own checks)."""
    def parse(text: str) -> Path:
        if not text.strip():
            what = {"file": "a file", "dir": "a folder"}.get(kind or "", "a file or folder ('.' is the current folder)")
            raise typer.BadParameter(f"an empty path; name {what}")
        path = Path(text)
        if kind == "file" and path.is_dir():
            raise typer.BadParameter(f"file {text!r} is a directory")
        if kind == "dir" and path.is_file():
            raise typer.BadParameter(f"dir {text!r} is a file")
        return path

    return parse


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr saying what was wrong and what to do, and a non-zero exit."""
    typer.echo(f"cnn-train: {message}", err=True)
    raise typer.Exit(code)


def _cli_type(annotation: Any) -> Any:
    """The declared type as typer takes it: a device request (a policy or cuda:N) is free text, a grid
    is repeated ``FIELD=V1,V2`` strings, a value that may be empty stays Optional."""
    if get_origin(annotation) is Annotated:
        return _cli_type(get_args(annotation)[0])
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType):
        inner = _cli_type(args[0]) if len(args) == 1 else str
        return Optional[inner] if type(None) in get_args(annotation) else inner  # noqa: UP045 - typer needs it
    if get_origin(annotation) is dict:
        return list[str]
    return annotation


def _as_items(mapping: dict[str, Any]) -> str:
    """A mapping as the repeated ``FIELD=VALUE[,VALUE...]`` items its option takes, for --help."""
    return " ".join(
        f"{field}={','.join(map(str, value)) if isinstance(value, list) else value}" for field, value in mapping.items()
    )


def cli_options(
    *models: type[BaseModel], exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a ``def command(**values)`` the models' fields as typer options (help: each description)."""
    from cnn_train.flows.signatures import declared_fields

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        parameters = []
        for name, (annotation, info) in declared_fields(models, exclude).items():
            names = (_OPTION_NAMES[name],) if name in _OPTION_NAMES else ()
            default, shown = info.default, True
            if isinstance(default, dict):
                # typer would hand a dict default to the command as one str(dict) item: None stands in for
                # it, and the command takes the declared default (declared_default).
                default, shown = None, _as_items(info.default) or False
            option = typer.Option(*names, help=info.description, show_default=shown, metavar=_METAVARS.get(name))
            parameters.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=Annotated[_cli_type(annotation), option],
                )
            )
        # A command may also take typer's context as ``ctx`` (to tell an option given from its default).
        if "ctx" in inspect.signature(fn).parameters:
            parameters.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        fn.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return fn

    return decorate


def declared_default(model: type[BaseModel], name: str) -> Any:
    """A field's declared default, a fresh copy (a mapping's CLI option is None when not given)."""
    return model.model_fields[name].get_default(call_default_factory=True, validated_data={})
