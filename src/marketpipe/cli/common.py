"""What every ``marketpipe`` command shares: the root app and its sub-apps, the consoles, the one way
a command fails (:func:`report_error`, :func:`handle_errors`, the root :class:`Group`), the common
options, config and symbol loading, and output. Command modules import this module only; the
command line is assembled in :mod:`marketpipe.cli.main`."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer._click import exceptions as click_errors  # typer 0.29 parses with its own copy of click
from typer.core import TyperGroup

from marketpipe.core.errors import InvalidArgument, MarketpipeError, OutputError
from marketpipe.core.log import configure as configure_logging
from marketpipe.core.metrics import ERRORS
from marketpipe.core.validation import validate_enum, validate_required

if TYPE_CHECKING:
    from marketpipe.core.config import Config
    from marketpipe.store.base import Store

err = Console(stderr=True)


def report_error(exc: MarketpipeError) -> int:
    """The one way a command fails: ``error[CODE]: message`` on stderr, counted; returns the exit status
    (2 for a bad argument, 1 otherwise)."""
    ERRORS.labels(exc.code).inc()
    error_line(exc.code, exc.message)
    return 2 if isinstance(exc, InvalidArgument) else 1


Fields = tuple[int, int, str, str]  # total, completed, rate, info: what the bar shows of a run's stats


def backfill_fields(stats: Any) -> Fields:
    """A backfill run's stats as the bar shows them (bars received of those expected, bars/s, requests)."""
    total = max(stats.est_rows, stats.bars_received, 1)
    return (
        total,
        min(stats.bars_received, total),
        f"{stats.bars_per_second:,.0f} bars/s",
        f"req {stats.requests}  retries {stats.retries}  rejected {stats.bars_rejected}",
    )


@contextlib.contextmanager
def progress_bar(
    label: str, show: bool, fields: Callable[[Any], Fields] = backfill_fields
) -> Iterator[Callable[[Any], None] | None]:
    """The progress bar on stderr that backfill, update, repair and export share: yields the callback a
    run's ``progress`` takes (its stats as work is committed; ``fields`` says what of them to show), or
    None when ``show`` is false (``--no-progress``, or stderr not a terminal)."""
    if not show:
        yield None
        return
    columns = (
        TextColumn(f"[bold]{escape(label)}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(label, total=None, rate="", info="planning")

        def update(stats: Any) -> None:
            total, completed, rate, info = fields(stats)
            progress.update(task, total=total, completed=completed, rate=rate, info=info)

        yield update


def error_line(code: str, text: str) -> None:
    """``error[CODE]: text`` on stderr as one physical line however long (soft_wrap: never folded at the
    console width, a pipe's 80 columns included); ``text`` is plain, never Rich markup."""
    err.print(f"[bold red]error[{escape(code)}][/]: {escape(text)}", highlight=False, markup=True, soft_wrap=True)


class Group(TyperGroup):
    """The root command. A value click refuses while parsing (``--port 99999``, ``--log-level loud``, an
    unknown option, a missing argument) ends like every other failure: one ``error[INVALID_ARGUMENT]``
    line and exit 2, instead of click's usage box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # the help is already printed
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            sys.exit(report_error(_usage_error(exc)))
        except click_errors.ClickException as exc:
            sys.exit(report_error(InvalidArgument(exc.format_message())))
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _usage_error(exc: click_errors.UsageError) -> InvalidArgument:
    param = getattr(exc, "param", None)
    name = getattr(param, "name", None)
    message = exc.format_message().rstrip(".")
    if exc.ctx is not None:
        message += f" (see {exc.ctx.command_path} --help)"
    return InvalidArgument(message, details={"parameter": name} if name else None)


app = typer.Typer(
    name="marketpipe",
    help="Market data: fetched (Alpaca first), checked, stored, served.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
store_app = typer.Typer(help="Look inside the local store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(store_app, name="store")

out = Console()
if not out.is_terminal:  # piped or captured: nobody's window to fit, so never cut columns at 80
    out = Console(width=max(out.width, 200))
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="DuckDB store file or postgresql://user@host:port/db (overrides the config)."),
]
LimitOpt = typer.Option("--limit", min=0, help="at most this many rows")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def handle_errors(fn: F) -> F:
    """One line on stderr with the stable code, a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MarketpipeError as exc:
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


CLI_VAR = "MARKETPIPE_CLI"  # set by ./dev: how the user ran this command line ("./dev marketpipe")


def cli_command() -> str:
    """The command to print in a hint so that it works as printed: ``$MARKETPIPE_CLI`` (``./dev`` sets it),
    else ``marketpipe`` when that is on PATH and is this program, else the absolute path of the script."""
    import os
    import shutil
    import sys

    via = os.environ.get(CLI_VAR, "").strip()
    if via:
        return via
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    script = argv0 if argv0 is not None and argv0.name == "marketpipe" else Path(sys.executable).parent / "marketpipe"
    on_path = shutil.which("marketpipe")
    if on_path is not None and (not script.is_file() or Path(on_path).resolve() == script.resolve()):
        return "marketpipe"
    return str(script.resolve()) if script.is_file() else "marketpipe"


def load_config(path: Path | None, store: str | Path | None = None) -> Config:
    """The config from ``path`` (or the usual search), with ``--store`` (a file or a URL) overriding
    its store."""
    from marketpipe.core.config import load_config as load

    cfg = load(path)
    if store is not None:
        cfg.store.path = str(store)
        cfg.store.url = None
    return cfg


def read_symbols(symbols: list[str], symbols_file: Path | None) -> list[str]:
    """The symbols given, plus those of ``--symbols-file`` (one or more a line, ``#`` comments), canonical."""
    from marketpipe.core.schema import normalize_symbols

    items = list(symbols)
    if symbols_file is not None:
        if not symbols_file.is_file():
            raise InvalidArgument(f"symbols file not found: {symbols_file}", details={"parameter": "symbols-file"})
        try:
            text = symbols_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"symbols file {symbols_file} is not UTF-8 text (byte {exc.start}): one symbol per line expected",
                details={"parameter": "symbols-file", "path": str(symbols_file)},
            ) from None
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read symbols file {symbols_file}: {exc.strerror or exc}",
                details={"parameter": "symbols-file", "path": str(symbols_file)},
            ) from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            items += [p for p in line.replace(",", " ").split() if p]
    return normalize_symbols(items)


@app.callback()
def main(
    log_level: Annotated[LogLevel, typer.Option("--log-level", case_sensitive=False)] = "warning",
    log_json: Annotated[bool, typer.Option("--log-json", help="Log lines as JSON.")] = False,
) -> None:
    configure_logging(log_level, json=log_json)


# --- output ----------------------------------------------------------------------------------------


def write_output(path: Path, write: Callable[[Any], object], *, parameter: str = "output") -> None:
    """Write a file the user named: ``write`` gets a binary file object for a temporary file beside
    ``path``, which replaces ``path`` only once complete. A path that cannot be written (no such
    directory, a directory, permission, disk full) is OUTPUT_ERROR naming it; nothing partial is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(
            f"cannot write --{parameter} {path}: {exc.strerror or exc}",
            details={"parameter": parameter, "path": str(path)},
        ) from None


OUTPUT_FORMATS = ("table", "csv", "json", "parquet")
FORMAT_MESSAGE = "unknown format {value!r}; use table, csv, json or parquet"


def store_table(config: Path | None, store: str | None, read: Callable[[Store], Any]) -> None:
    """What a ``marketpipe store ...`` listing does: open the configured store (``--store`` wins),
    read one frame from it with ``read`` and print it as a table. A missing store is an error, not an
    empty table (nor a new empty file)."""
    from marketpipe.store import open_store

    with open_store(load_config(config, store), create=False) as st:
        emit(read(st), "table", None)


def emit(frame: Any, fmt: str, output: Path | None) -> None:
    """A frame as a table on the console, or CSV/JSON on stdout or in ``output``, or Parquet in ``output``;
    its columns named as users see them everywhere (``timestamp``, not the store's ``ts``)."""
    from marketpipe.service.frames import public

    fmt = validate_enum(fmt, OUTPUT_FORMATS, "format", casefold=True, message=FORMAT_MESSAGE)
    frame = public(frame)
    if fmt == "parquet":
        path = validate_required(output, "output", message="--format parquet needs --output FILE")
        write_output(path, frame.write_parquet)
        err.print(f"wrote {frame.height} rows to {output}")
        return
    if fmt == "csv":
        text = frame.write_csv()
    elif fmt == "json":
        text = frame.write_json()
    elif fmt == "table":
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in frame.columns:
            # Fold long cells rather than let rich squeeze whole columns out of a narrow terminal.
            table.add_column(col, overflow="fold", min_width=min(len(col), 10))
        for row in frame.iter_rows():
            table.add_row(*("" if v is None else str(v) for v in row))
        out.print(table)
        return
    if output:
        write_output(output, lambda fh: fh.write(text.encode()))
        err.print(f"wrote {frame.height} rows to {output}")
    else:
        sys.stdout.write(text)
