"""FakeEngine: a tiny stand-in for LLMEngine with the same API, for server tests that need no model.

Tokens are characters: token id = code point, a prompt's tokens are its characters, and completion `j` of a
request generates "abcd..." shifted by `j`. Prompt words steer failures: "reject" -> add_request raises ValueError,
"boom<k>" -> step() raises once that request has k output tokens, "hold" -> the request never progresses.
"""

import re
import threading
import time

from jaxpaged.metrics import Counter, Gauge
from jaxpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpaged.sampling_params import RequestOutputKind


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        text.encode("utf-8")  # raises on lone surrogates, as a real tokenizer does
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        text = "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __len__(self) -> int:
        return 0x110000


class _Req:
    def __init__(self, request_id, prompt, ids, params):
        self.request_id, self.prompt, self.ids, self.params = request_id, prompt, ids, params
        self.tokens = [[] for _ in range(params.n)]
        self.sent = [0] * params.n  # per completion: tokens already in a DELTA output
        m = re.search(r"boom(\d+)", prompt or "")
        self.boom_at = int(m.group(1)) if m else None


class FakeEngine:
    """LLMEngine's API over `_Req`s; `aborted` records abort_request ids, `idle_steps` steps without work; the
    events tell when a request was added / aborted."""

    model_name = "fake"
    max_model_len = 64

    def __init__(self, step_seconds: float = 0.002):
        self.tokenizer = FakeTokenizer()
        self.requests: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.abort_event = threading.Event()
        self.added_event = threading.Event()
        self.idle_steps = 0
        self.generated = 0
        self._step_seconds = step_seconds  # stands for device time

    def add_request(self, request_id, prompt, params) -> None:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        ids = ids if ids is not None else self.tokenizer.encode(text)
        if "reject" in (text or ""):
            raise ValueError("fake engine rejects this prompt")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.requests[request_id] = _Req(request_id, text, list(ids), params)
        self.added_event.set()

    def abort_request(self, request_ids) -> None:
        for rid in request_ids:
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)
                self.abort_event.set()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def run_idle_work(self) -> None:
        return None

    def step(self) -> list[RequestOutput]:
        if not self.requests:
            self.idle_steps += 1
            return []
        time.sleep(self._step_seconds)
        outputs = []
        for req in list(self.requests.values()):
            if "hold" in (req.prompt or ""):
                continue
            if req.boom_at is not None and len(req.tokens[0]) == req.boom_at:
                req.boom_at = None
                raise RuntimeError("fake device failure")
            for j, toks in enumerate(req.tokens):
                if len(toks) < req.params.max_tokens:
                    toks.append(ord("a") + (len(toks) + j) % 26)
                    self.generated += 1
            out = self._output(req)
            if out.finished:
                del self.requests[req.request_id]
            if out.finished or req.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(out)
        return outputs

    def _output(self, req: _Req) -> RequestOutput:
        """Cumulative, or only the tokens since the previous output for DELTA (as LLMEngine)."""
        outs = []
        delta = req.params.output_kind is RequestOutputKind.DELTA
        for j, all_toks in enumerate(req.tokens):
            done = len(all_toks) >= req.params.max_tokens
            toks = all_toks[req.sent[j]:] if delta else all_toks
            req.sent[j] = len(all_toks)
            lps = None
            if req.params.logprobs is not None:
                lps = [{t: Logprob(-0.5, 1, chr(t)), **{t + k: Logprob(-1.0 - k, k + 1, chr(t + k))
                                                         for k in range(1, req.params.logprobs)}} for t in toks]
            outs.append(CompletionOutput(j, self.tokenizer.decode(toks), list(toks), None, lps,
                                         "length" if done else None))
        finished = all(o.finish_reason for o in outs)
        return RequestOutput(req.request_id, req.prompt, req.ids, None, outs, finished, num_cached_tokens=2)

    def get_metrics(self) -> list:
        return [Gauge("vllm:num_requests_running", len(self.requests)), Gauge("vllm:num_requests_waiting", 0),
                Gauge("vllm:kv_cache_usage_perc", 0.5 if self.requests else 0.0),
                Counter("vllm:generation_tokens", self.generated)]
