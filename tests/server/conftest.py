"""One real server for the whole server suite: the embedded model behind uvicorn on 127.0.0.1, in this process.

Session-scoped so the model load and bucket compilation are paid once for every file (FakeEngine tests start
their own servers and need no model).
"""

import httpx
import pytest

from jaxpaged.config import EngineArgs
from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncLLMEngine
from tests.server.helpers import serve_in_thread

MODEL = "smollm2"
API_KEY = "test-key"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def server():
    """(base_url, AsyncLLMEngine) once the engine is warm and uvicorn is accepting connections."""
    engine = AsyncLLMEngine(EngineArgs(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
                                       max_num_batched_tokens=128, seed=0, served_model_name=MODEL))
    with serve_in_thread(build_app(engine, api_key=API_KEY)) as url:
        assert engine.ready.wait(900) and engine.start_error is None, engine.start_error
        yield url, engine
    engine.shutdown()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
