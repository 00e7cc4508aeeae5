"""Helpers for the server tests: a tiny model's app, run on uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from megatier import LLM
from megatier.serve.app import create_app
from megatier.serve.server import Server, make_server

MAX_MODEL_LEN = 256


def make_app(model_dir, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, **kw):
    llm = LLM(
        str(model_dir),
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return create_app(llm, served_model_name="tiny", **kw)


@contextmanager
def live_server(app, shutdown_timeout: float = 5.0) -> Iterator[tuple[str, Server]]:
    """Serve `app` until the block ends; yield (base url, the uvicorn server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


def assert_refused(url: str, path: str, body: dict, param: str | None) -> dict:
    """POST `body`: a 400 whose one-line error names `param`; then a plain chat request still succeeds.
    Returns the error."""
    import httpx

    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
    plain = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{url}/v1/chat/completions", json=plain).status_code == 200
    return error
