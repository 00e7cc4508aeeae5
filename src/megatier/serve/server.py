"""`megatier serve`: load the model, then run the app on uvicorn with a graceful drain.

On Ctrl-C or SIGTERM uvicorn stops accepting connections; streams in flight get `shutdown_timeout`
seconds to finish, then end with finish_reason "abort" (a final chunk and [DONE], not a cut
connection); a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

import uvicorn

from megatier.args import EngineArgs
from megatier.llm import LLM
from megatier.serve.app import create_app
from megatier.serve.async_engine import AsyncEngine

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.engine.drain(self.shutdown_timeout))
        await super().shutdown(sockets)
        await drain


def make_server(app, host: str, port: int, shutdown_timeout: float = 10.0, log_level: str = "info") -> Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout + 5,  # backstop if a response will not end
    )
    return Server(config, app.state.megatier.engine, shutdown_timeout)


def served_model_name(args: argparse.Namespace) -> str:
    """What clients send as "model": --served-model-name, else --model as typed (as vLLM does), else the
    embedded default model's name."""
    if args.served_model_name or args.model:
        return args.served_model_name or args.model
    from megatier.gguf_import import DEFAULT_GGUF_NAME

    return DEFAULT_GGUF_NAME.split(".")[0]


def run_server(args: argparse.Namespace) -> None:
    llm = LLM.from_args(EngineArgs.from_cli(args))
    name = served_model_name(args)
    app = create_app(llm, served_model_name=name, api_key=args.api_key, max_queue_len=args.max_queue_len)
    print(f"megatier: serving {name!r} ({llm.backend} on {llm.device}) at http://{args.host}:{args.port}/v1")
    make_server(app, args.host, args.port, args.shutdown_timeout).run()
