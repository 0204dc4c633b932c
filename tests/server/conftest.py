"""One server per test session: the embedded model behind uvicorn on 127.0.0.1, in this process."""

import socket
import threading

import httpx
import pytest
import uvicorn

from jaxpaged.config import EngineArgs
from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncLLMEngine

MODEL = "smollm2"
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    """Yields (base_url, AsyncLLMEngine) once the engine is warm and uvicorn is accepting connections."""
    engine = AsyncLLMEngine(EngineArgs(dtype="float32", max_model_len=1024, max_num_seqs=16,
                                       max_num_batched_tokens=128, seed=0, served_model_name=MODEL))
    engine.start()
    port = free_port()
    config = uvicorn.Config(build_app(engine, MODEL, API_KEY), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert engine.ready.wait(600) and engine.start_error is None
    while not srv.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(30)
    engine.shutdown()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
