"""Incremental detokenization and stop-string handling for one sequence."""

from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT = 4  # prompt tokens fed first so that the first output token gets its leading space right


class IncrementalDetokenizer:
    """Appends generated tokens and keeps the output text, correct across multi-byte characters.

    Uses the fast tokenizer's `DecodeStream` (bytes of a split character are held until complete). Stop strings
    are searched only in the new text plus a tail of the old; the matched stop string is cut (or kept with
    `include_stop_str_in_output`). While unfinished, the last `len(longest stop) - 1` characters are held back
    from `text` so a stream never shows a prefix of a stop string that is later removed (as vLLM does).
    Tokens added by `extend` are decoded when the text is next read (or a token is appended), all in one call:
    a request whose text is read only at its end (FINAL_ONLY outputs) is decoded once, not in every step.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] = (), include_stop_str_in_output: bool = False):
        self._tokenizer = tokenizer._tokenizer  # tokenizers.Tokenizer behind a transformers fast tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token in prompt_token_ids[-_PROMPT_CONTEXT:]:
            self._stream.step(self._tokenizer, token)
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        self._holdback = max(map(len, self._stop), default=1) - 1
        self._text = ""
        self._unread: list[int] = []  # ids from `extend` not decoded yet
        self.finished = False

    @property
    def output_text(self) -> str:
        """All the text so far (stop strings cut), hold-back included."""
        if self._unread:
            self._text += self._stream.step(self._tokenizer, self._unread) or ""
            self._unread = []
        return self._text

    def append(self, token_id: int) -> str | None:
        """Adds one token; returns the stop string it completed, if any (then the text is final)."""
        text = self.output_text  # decodes what `extend` added first
        chunk = self._stream.step(self._tokenizer, token_id)
        if not chunk:
            return None
        start = max(0, len(text) - self._holdback)
        self._text = text = text + chunk
        found = [(at, stop) for stop in self._stop if (at := text.find(stop, start)) >= 0]
        if not found:
            return None
        at, stop = min(found, key=lambda f: f[0])
        self._text = text[: at + len(stop) if self._include_stop else at]
        self.finished = True
        return stop

    def extend(self, token_ids: list[int]) -> None:
        """Adds several tokens (decoded when the text is next read), for a sequence without stop strings."""
        self._unread += token_ids

    @property
    def text(self) -> str:
        """Text safe to show now: all of it once finished, else without the possible stop-string prefix."""
        text = self.output_text
        if self.finished or not self._holdback:
            return text
        return text[: max(0, len(text) - self._holdback)]

    def finish(self) -> None:
        self.finished = True


class NoTextDetokenizer:
    """Stands in when the model has no tokenizer: outputs carry token ids and empty text."""

    text = output_text = ""

    def append(self, token_id: int) -> None:
        return None

    def extend(self, token_ids: list[int]) -> None:
        pass

    def finish(self) -> None:
        pass


def make_detokenizer(tokenizer, prompt_token_ids: list[int], **kwargs):
    """An IncrementalDetokenizer, or a NoTextDetokenizer when `tokenizer` is None."""
    if tokenizer is None:
        return NoTextDetokenizer()
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, **kwargs)
