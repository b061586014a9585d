"""``python -m gpupool.broker``: amqtt, a pure-Python MQTT broker, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from gpupool._process import announce_ready
from gpupool.broker import free_port


async def serve(host: str, port: int) -> None:
    """Run amqtt on ``host:port`` until SIGTERM or SIGINT."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    announce_ready("broker", kind="amqtt", url=f"mqtt://{host}:{port}", host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await broker.shutdown()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(prog="python -m gpupool.broker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s broker %(levelname)s %(message)s")
    asyncio.run(serve(args.host, args.port or free_port(args.host)))


if __name__ == "__main__":
    main()
