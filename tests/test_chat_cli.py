"""`jaxpaged chat` driven through a pseudo-terminal, and `jaxpaged generate --stream`, on the embedded model."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

JAXPAGED = [sys.executable, "-m", "jaxpaged.cli"]
# small batch limits: 11 step programs to compile instead of 23
ENGINE_FLAGS = ["--temperature", "0", "--max-model-len", "512", "--max-num-seqs", "4",
                "--max-num-batched-tokens", "128"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TERM": "dumb"}
START_TIMEOUT = 600  # loading and compiling on a shared 2-core CPU; the XLA cache makes later starts quicker
REPLY_TIMEOUT = 120
PROMPT = ">>> "


class Terminal:
    """`jaxpaged chat` on a pseudo-terminal (its controlling terminal, so "\\x03" is a real Ctrl-C)."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execve(argv[0], argv, ENV)
        self.buffer = ""

    def expect(self, text: str, timeout: float) -> str:
        """Reads until `text` appears; returns what came before it and consumes both. Fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} after {timeout} s; the terminal shows {self.buffer[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"chat exited before {text!r}; the terminal shows {self.buffer[-2000:]!r}"
                self.buffer += chunk.decode(errors="replace").replace("\r\n", "\n")
        before, _, self.buffer = self.buffer.partition(text)
        return before

    def ask(self, question: str) -> str:
        """Sends one line and returns the streamed reply (the echoed line removed) once the prompt is back."""
        self.send(question + "\n")
        self.expect(question + "\n", REPLY_TIMEOUT)
        return self.expect(PROMPT, REPLY_TIMEOUT)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float) -> int:
        """The exit code of the chat, failing if it has not exited within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            select.select([self.fd], [], [], 0.1)  # drain nothing, just wait a little for the exit
        raise AssertionError(f"chat still running after {timeout} s")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture(scope="module")
def chat():
    term = Terminal(JAXPAGED + ["chat", "--max-tokens", "200", *ENGINE_FLAGS])
    term.expect(PROMPT, START_TIMEOUT)
    yield term
    term.kill()


def test_chat_streams_the_answer_and_keeps_the_history(chat):
    assert "Paris" in chat.ask("What is the capital of France?")
    with_history = chat.ask("What did I just ask you about?")
    assert re.search(r"France|capital|Paris", with_history), with_history
    chat.send("/reset\n")
    chat.expect("(conversation cleared)", REPLY_TIMEOUT)
    chat.expect(PROMPT, REPLY_TIMEOUT)
    # greedy decoding: the same question gets another answer once the history is gone
    assert chat.ask("What did I just ask you about?") != with_history


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chat):
    chat.send("Write a very long story about a dragon.\n")
    chat.expect("dragon.\n", REPLY_TIMEOUT)
    partial = chat.expect(" ", REPLY_TIMEOUT)  # the reply has started streaming
    chat.send("\x03")
    stopped = chat.expect("(stopped)", REPLY_TIMEOUT)
    chat.expect(PROMPT, REPLY_TIMEOUT)
    assert len((partial + stopped).split()) < 150, "the reply ran on instead of stopping"
    assert "Paris" in chat.ask("What is the capital of France?")


def test_exit_command_leaves_with_code_0(chat):
    chat.send("/exit\n")
    assert chat.wait(REPLY_TIMEOUT) == 0


def test_generate_stream_prints_the_answer_and_no_noise():
    proc = subprocess.run(JAXPAGED + ["generate", "--stream", "What is the capital of France?", "--max-tokens", "32",
                                      *ENGINE_FLAGS[2:]],
                          capture_output=True, text=True, env=ENV, timeout=START_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "PyTorch was not found" not in proc.stderr
    assert not re.search(r"^INFO ", proc.stderr, re.M), proc.stderr
    assert "Unable to initialize backend" not in proc.stderr
