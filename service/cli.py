"""``python -m service`` / ``model-serving``: parse settings, serve, and shut down gracefully.

Every field of :class:`Settings` becomes a ``--flag`` (its description, env var and default in
``--help``); flags override ``SERVING_*`` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import prometheus_client
from aiohttp import web
from pydantic import ValidationError

from service import log as logs
from service.api import keys
from service.app import create_app
from service.lifecycle.manager import LIFECYCLE_THREAD_PREFIX
from service.settings import ENV_PREFIX, Settings

log = logging.getLogger("service")


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        return ",".join(default) or "(empty)"
    return "(unset)" if default is None else str(default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-serving",
        description="Serve a HuggingFace chat model over HTTP, with zero-downtime model swaps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag can also be set by its environment variable; flags win.",
    )
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,  # unset flags leave the env var or default in charge
            metavar=name.upper(),
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}; default: {_default_text(name)}]",
        )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    given: dict[str, Any] = vars(parser.parse_args(argv))
    try:
        return Settings(**given)
    except ValidationError as exc:
        parser.error(
            "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        )


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain: readiness fails at once, new requests get 503,
    in-flight ones get ``shutdown_grace_s`` to finish."""
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which frees its batch slot.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    try:  # whatever ends serving (a port in use included), the engine and the models are torn down
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        where = {"host": settings.host, "port": settings.port}
        if settings.console:
            shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
            where["console"] = f"http://{shown_host}:{settings.port}/"
        log.info("listening", extra=where)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

        gate = app[keys.GATE]
        gate.close()
        log.info("draining", extra={"in_flight": gate.in_flight, "grace_s": settings.shutdown_grace_s})
        drained = await gate.wait_idle(settings.shutdown_grace_s)
        log.info("drained" if drained else "grace period over", extra={"in_flight": gate.in_flight})
    finally:
        await runner.cleanup()
    log.info("stopped")


#: glibc's ``mallopt`` parameter for the most malloc arenas (``malloc.h``).
_M_ARENA_MAX = -8


def _one_malloc_arena() -> None:
    """Have glibc keep one malloc arena for every thread, unless ``MALLOC_ARENA_MAX`` says otherwise.

    glibc gives each thread that allocates its own arena (up to 8 per core), and an arena returns
    freed memory to the OS only from its top. The loader, engine and event-loop threads each left tens
    of MiB of freed tensors resident in theirs: one arena measured 47-52 MiB less peak RSS at 8 streams
    (bundled model, ``make bench``'s prompts; two arenas half that) at the same tok/s, since the
    threads allocate far less often than they compute. What it costs is contention while a prompt of
    ~1 MiB is tokenized (``benchmarks/tokenize_stall.py``, six interleaved pairs: the other streams'
    longest token gap 0.29-0.43 s, median 0.34, against 0.21-0.39 s, median 0.28, with glibc's
    default). Does nothing where libc is not glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


def main(argv: list[str] | None = None) -> None:
    _one_malloc_arena()  # before any thread allocates
    settings = parse_settings(argv)
    logs.configure(settings.log_level)
    # The *_created series double every counter and histogram and no dashboard reads them.
    prometheus_client.disable_created_metrics()
    log.info("starting", extra={"settings": json.loads(settings.model_dump_json(exclude={"admin_token"}))})
    asyncio.run(serve(settings))
    if any(t.name.startswith(LIFECYCLE_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate()):
        # A model still loading in its daemon thread (SIGTERM mid-deployment) would meet the
        # interpreter's teardown inside PyTorch's C++ and abort the process (SIGABRT, "terminate called
        # without an active exception"). Everything is closed and logged by now: leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
