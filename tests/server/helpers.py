"""Running an app under uvicorn on 127.0.0.1 in a thread, and reading SSE streams."""

import contextlib
import json
import socket
import threading

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(uvicorn.Server):
    """uvicorn.Server that signals when it accepts connections."""

    def __init__(self, config):
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets)
        self.listening.set()


@contextlib.contextmanager
def serve_in_thread(app):
    """Yields the base URL once uvicorn listens; stops it afterwards (the app's lifespan runs both ways)."""
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert server.listening.wait(60), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def sse_events(lines) -> list:
    """The JSON payloads of an SSE body (lines), with "[DONE]" kept as the string; asserts the framing."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
