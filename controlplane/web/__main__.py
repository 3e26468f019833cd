"""``python -m controlplane.web``: the head's HTTP service, in a process of its own (the
GCS URL and the cluster token in its environment, never in argv). It writes the address
it listens at to ``<session>/dashboard.address`` (with ``--session-dir``) and prints it."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from aiohttp import web

from controlplane import auth
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.parent_death import die_with_parent
from controlplane.web.app import WebContext, make_app

ADDRESS_FILE = "dashboard.address"


async def serve(context: WebContext, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(context), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    address = f"{host}:{bound[1]}"
    if context.session_dir is not None:
        (context.session_dir / ADDRESS_FILE).write_text(address)
    print(f"Cairn's dashboard at http://{address}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane.web")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8265)
    parser.add_argument("--session-dir", type=Path, default=None)
    parser.add_argument("--die-with-parent", action="store_true")
    args = parser.parse_args()
    if args.die_with_parent:
        die_with_parent()
    context = WebContext(
        os.environ[GCS_URL_ENV], os.environ.get(auth.TOKEN_ENV) or None, args.session_dir
    )
    asyncio.run(serve(context, args.host, args.port))


if __name__ == "__main__":
    main()
