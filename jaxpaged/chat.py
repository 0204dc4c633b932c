"""`jaxpaged chat`: an interactive terminal chat that streams each reply as the engine generates it.

A terminal UI, so it prints. `stream_reply` is also what `jaxpaged generate --stream` prints with.
"""

import signal
import sys
from collections.abc import Callable

from jaxpaged.engine import LLMEngine, PromptType
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams

PROMPT = ">>> "
HELP = "Chat with the model: /reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply."


class _CtrlC:
    """Turns Ctrl-C into a flag while a reply streams, so that the engine is never interrupted half-way through
    a step (its page tables and in-flight step stay consistent); restores the previous handler on exit."""

    def __enter__(self) -> "_CtrlC":
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.pressed = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def write_stdout(text: str) -> None:
    """Writes `text` to stdout at once (no line buffering), for streaming."""
    sys.stdout.write(text)
    sys.stdout.flush()


def stream_reply(engine: LLMEngine, request_id: str, prompt: PromptType, params: SamplingParams,
                 write: Callable[[str], None] = write_stdout) -> tuple[str, bool]:
    """Runs one request on `engine`, calling `write(delta)` with each new piece of its text as it is generated.

    Ctrl-C (SIGINT, in the main thread) stops the request: it is aborted. Either way the engine is drained before
    returning, so no step is left in flight (with async scheduling one step runs past the last token; a process
    that exits while a device computation runs aborts in XLA's runtime). Raises ValueError (nothing queued) for an
    invalid prompt. Returns (the text generated, whether Ctrl-C stopped it).
    """
    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA
    engine.add_request(request_id, prompt, params)
    parts: list[str] = []
    finished = False
    with _CtrlC() as ctrl_c:
        while not finished and not ctrl_c.pressed:
            for out in engine.step():
                if out.request_id == request_id:
                    parts.append(out.outputs[0].text)
                    write(parts[-1])
                    finished = out.finished
        if not finished:
            engine.abort_request([request_id])
        while engine.has_unfinished_requests():  # the step in flight still has to be collected
            engine.step()
    return "".join(parts), not finished


def chat_prompt(tokenizer, messages: list[dict]) -> dict:
    """The engine prompt for a conversation: its chat template with the assistant's turn opened, as `LLM.chat`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


class ChatSession:
    """A conversation with the engine: the messages so far, and one streamed reply per `send`."""

    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None = None):
        self.engine = engine
        self.params = params
        self.system = system
        self.messages: list[dict] = []
        self._turns = 0
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, user_text: str, write: Callable[[str], None] = write_stdout) -> bool:
        """Streams the reply to `user_text` through `write` and keeps both in the conversation, the reply even if
        Ctrl-C cut it short. Raises ValueError (conversation unchanged) if the prompt does not fit the context.
        Returns whether Ctrl-C stopped the reply."""
        self._turns += 1
        messages = self.messages + [{"role": "user", "content": user_text}]
        prompt = chat_prompt(self.engine.tokenizer, messages)
        reply, stopped = stream_reply(self.engine, f"chat-{self._turns}", prompt, self.params, write)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return stopped


def run_chat(session: ChatSession) -> int:
    """The read-reply loop on the terminal until /exit, EOF (Ctrl-D) or Ctrl-C at the prompt; returns 0."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(HELP)
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
        elif line:
            _reply(session, line)


def _reply(session: ChatSession, line: str) -> None:
    try:
        stopped = session.send(line)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    print("\n(stopped)" if stopped else "")
