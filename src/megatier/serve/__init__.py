"""The OpenAI-compatible HTTP server: `megatier serve`.

protocol.py      request bodies (pydantic) -> SamplingParams
async_engine.py  the thread that owns the Engine, and per-request update streams for asyncio
responses.py     OpenAI response bodies and SSE chunks built from engine updates
metrics.py       Prometheus series (TTFT, inter-token latency, queue depth, KV pages)
app.py           the FastAPI routes, API key check and OpenAI-style errors
server.py        uvicorn with a graceful drain on shutdown
"""
