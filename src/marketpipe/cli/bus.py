"""The bus commands (registered on the main app): ``marketpipe worker``, ``marketpipe events tail`` and
the distributed side of ``marketpipe backfill --distributed``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import Annotated, Any

import typer

from marketpipe.cli.common import ConfigOpt, Fields, StoreOpt, app, err, handle_errors, load_config, out, progress_bar
from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument

events_app = typer.Typer(help="Events on the NATS bus (the bus url in the config).", no_args_is_help=True)
app.add_typer(events_app, name="events")


def _bus_config(config: Config) -> Config:
    if not config.bus.target():
        raise InvalidArgument(
            'no bus configured: set [bus] url = "nats://host:4222" or MARKETPIPE_BUS_URL', details={"parameter": "bus"}
        )
    return config


def _progress_fields(p: Any) -> Fields:
    rate = p.bars_received / p.seconds if p.seconds > 0 else 0.0
    return (
        max(p.total, 1),
        p.finished,
        f"{rate:,.0f} bars/s",
        f"{p.finished}/{p.total} items  {len(p.workers)} workers  {p.bars_stored:,} stored  {len(p.dead)} dead",
    )


def run_distributed(
    config: Config, symbols: list[str], start: str, end: str | None, timeframe: str, feed: str | None, show: bool
) -> None:
    """Plan, enqueue, and follow the workers with one progress bar; exit 1 when items went dead."""
    from marketpipe.bus.client import connect
    from marketpipe.service.data import MarketData, parse_series
    from marketpipe.service.distributed import enqueue, follow

    _bus_config(config)

    async def go() -> Any:
        syms, tf, s, e = parse_series(symbols, timeframe, start, end)
        data = MarketData(config)
        bus = await connect(config.bus)
        try:
            await bus.ensure_streams()
            enq = await enqueue(data, bus, syms, tf, s, e, feed=feed)
            err.print(
                f"run {enq.run}: {len(enq.items)} work items ({enq.new} new, {enq.duplicates} already queued), "
                f"{len(enq.covered)} symbols already covered",
                highlight=False,
            )
            with progress_bar("distributed backfill", show, _progress_fields) as bar:
                prog = await follow(bus, enq, on_progress=bar)
            return enq, prog
        finally:
            await bus.close()
            await data.aclose()

    enq, prog = asyncio.run(go())
    out.print(
        f"{prog.finished}/{len(enq.items)} items finished by {len(prog.workers)} worker(s): "
        f"{prog.bars_received:,} bars received, {prog.bars_stored:,} newly stored, {len(prog.dead)} dead; "
        f"{prog.seconds:.2f}s",
        highlight=False,
    )
    if prog.dead:
        for item, error in prog.dead.items():
            err.print(f"dead: {item}: {error}", highlight=False, markup=False)
        raise typer.Exit(1)


@app.command()
@handle_errors
def worker(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    idle_exit: Annotated[
        float | None, typer.Option("--idle-exit", help="stop after the queue stayed empty this many seconds")
    ] = None,
) -> None:
    """Take distributed backfill items from the bus, fetch, check and write them to the shared store.

    Run any number, on any machine, against the same bus url and PostgreSQL store url. SIGTERM or
    Ctrl-C finishes nothing half: the item in hand is not acked and goes to another worker."""
    from marketpipe.bus.client import connect
    from marketpipe.service.data import MarketData
    from marketpipe.service.distributed import run_worker

    cfg = _bus_config(load_config(config, store))

    async def go() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main.cancel)
        data = MarketData(cfg)
        bus = await connect(cfg.bus, name="marketpipe-worker")
        try:
            await bus.ensure_streams()
            return await run_worker(
                data,
                bus,
                stop=stop,
                idle_exit=idle_exit,
                on_ready=lambda w: err.print(f"worker {w.name} ready", highlight=False),
            )
        finally:
            await bus.close()
            await data.aclose()

    try:
        stats = asyncio.run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("worker stopped", highlight=False)
        return
    out.print(f"worker {stats.name}: {stats.done} done, {stats.retried} retried, {stats.dead} dead", highlight=False)


@events_app.command("tail")
@handle_errors
def events_tail(
    subject: Annotated[str, typer.Argument(help="NATS subject, wildcards allowed (mp.quality.>)")] = "mp.>",
    config: ConfigOpt = None,
    replay: Annotated[bool, typer.Option("--all", help="first every stored event of the subject's stream")] = False,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="stop after this many")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="stop after this many seconds")] = None,
) -> None:
    """Print bus events as JSON lines (subject, then the envelope) as they arrive."""
    from marketpipe.bus.client import connect

    cfg = _bus_config(load_config(config))

    async def go() -> None:
        bus = await connect(cfg.bus, name="marketpipe-tail")
        seen = 0
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            try:
                body: Any = json.loads(msg.data)
            except ValueError:
                body = msg.data.decode("utf-8", "replace")
            sys.stdout.write(json.dumps({"subject": msg.subject, "event": body}) + "\n")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                done.set()

        try:
            sub: Any
            if replay:
                stream = await bus.js.find_stream_name_by_subject(subject)
                sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, cb=on_msg)
            else:
                sub = await bus.nc.subscribe(subject, cb=on_msg)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=duration)
            await sub.unsubscribe()
        finally:
            await bus.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
