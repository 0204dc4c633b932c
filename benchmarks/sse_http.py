"""A streaming HTTP/1.1 POST and a server-sent-events parser on asyncio alone (no aiohttp / httpx: the device
machine may lack them). Enough for an OpenAI-compatible streaming endpoint: chunked or close-delimited bodies."""

import asyncio
import json
from collections.abc import AsyncIterator


class HTTPStatusError(Exception):
    """A non-200 response: its status and (the start of) its body."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:500].decode(errors='replace')}")
        self.status = status


class SSEParser:
    """Incremental server-sent-events parser: `feed(bytes)` returns the data of each event completed so far.

    Bytes may be split anywhere (inside a line, a CRLF or a UTF-8 character). An event ends at a blank line; its
    "data:" lines are joined with newlines; comments (":...") and other fields are ignored.
    """

    def __init__(self):
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = self._buffer[:end].rstrip(b"\r").decode()
            self._buffer = self._buffer[end + 1:]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
        return events


async def stream_post(host: str, port: int, path: str, body: dict,
                      headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
    """POSTs `body` as JSON on a fresh connection; yields the response body's bytes as they arrive.

    Raises HTTPStatusError on a status other than 200 (after reading up to 64 KiB of its body).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", "Accept: text/event-stream", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        fields = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        if status != 200:
            raise HTTPStatusError(status, await reader.read(65536))
        if "chunked" in fields.get("transfer-encoding", "").lower():
            while size := int((await reader.readline()).split(b";")[0], 16):
                yield await reader.readexactly(size)
                await reader.readline()  # the CRLF after each chunk
        else:
            while data := await reader.read(65536):
                yield data
    finally:
        writer.close()
