"""LLMEngine: requests in, RequestOutputs out; one `step()` = schedule -> run the jitted step -> update."""

import array
import atexit
import dataclasses
import gc
import logging
import os
import random
import weakref

import jax
import numpy as np

from jaxpaged import distributed
from jaxpaged.beam_processor import BeamProcessor, beam_children
from jaxpaged.beam_search import BeamSearchParams, BeamState
from jaxpaged.buckets import Buckets
from jaxpaged.config import EngineArgs, default_batch_limits
from jaxpaged.executable_cache import ExecutableCache
from jaxpaged.input_batch import ArrivedTokens
from jaxpaged.kv_pool import device_free_bytes, num_pages_for, page_bytes
from jaxpaged.metrics import Counter, EngineCounters, Gauge
from jaxpaged.models import load_model
from jaxpaged.models.fusion import fuse_projections
from jaxpaged.models.sharding import kv_heads_per_device, log_plan, make_mesh, shard_model
from jaxpaged.output_processor import OutputProcessor
from jaxpaged.outputs import RequestOutput
from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request, RequestStatus
from jaxpaged.runner import ModelRunner, StepHandle
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.scheduler import Scheduler
from jaxpaged.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedPrompt:
    """A prompt `LLMEngine.check_prompt` tokenized and validated: `add_request` and `add_beam_request` take it
    without doing either again (`LLM.generate` checks each prompt just before it queues it)."""

    text: str | None
    token_ids: list[int]


PromptType = str | list[int] | dict | CheckedPrompt


def _collect_in_flight(engine_ref: weakref.ref) -> None:
    """At interpreter exit, waits for a step still running on the device (its ids still on their way to the
    host): XLA's runtime aborts the process ("terminate called without an active exception") when it is torn down
    with one in flight, e.g. after a caller stopped stepping once its own requests finished."""
    engine = engine_ref()
    if engine is not None and engine._in_flight is not None:
        try:
            engine._in_flight.result()
        except Exception:  # noqa: BLE001  a step that failed (another process died) has nothing left to wait for
            pass


def _token_array(token_ids) -> array.array:
    """Prompt token ids as a C array of int64 (ValueError for anything that is not an integer): the vocabulary
    check is then one NumPy pass over it, and `check_prompt` makes it a list of Python ints once it passed."""
    try:
        return array.array("q", token_ids)
    except (TypeError, OverflowError) as e:
        raise ValueError(f"prompt token ids must be integers: {e}") from None


def _enable_compilation_cache(path: str | None) -> str:
    """Points JAX's persistent compilation cache at the folder and returns it; the executable cache inside it
    turns JAX's off while it can write (see `jaxpaged.executable_cache`)."""
    path = path or os.environ.get("JAXPAGED_CACHE_DIR") or os.path.expanduser("~/.cache/jaxpaged/xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class LLMEngine:
    """The engine behind `LLM` and the server. Not thread-safe: one thread drives it.

    With `async_scheduling` (the default, vLLM's name) one step is in flight: `step()` schedules and launches
    step N+1 before it processes step N's sampled ids, which the device already feeds into step N+1, so host
    work overlaps device work. A request that stops at step N has one extra token computed in N+1, dropped.
    Steps with repetition/presence/frequency penalties or beam searches run synchronously (the penalties read the
    tokens on the host; the host chooses each beam's next token). Greedy outputs are the same either way.
    """

    def __init__(self, args: EngineArgs):
        self.args = args
        distributed.initialize(distributed.group_from(args.coordinator_address, args.num_processes, args.process_id))
        distributed.check_mesh(args.tensor_parallel_size)
        cache_dir = _enable_compilation_cache(args.compilation_cache_dir)
        mesh = make_mesh(args.tensor_parallel_size) if args.tensor_parallel_size > 1 else None
        self.model = load_model(args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed, mesh=mesh)
        if mesh is not None:
            self.model = shard_model(self.model, mesh)
        self.model = fuse_projections(self.model, release=True)  # the loaded model is not kept
        cfg = self.model.config
        self.model_name = args.served_model_name or self.model.name
        tokenizer_path = args.tokenizer or self.model.tokenizer_path
        tokenizer_kwargs = {} if args.tokenizer else self.model.tokenizer_kwargs
        # A shape-only dummy config has no tokenizer: prompts are then token ids and outputs carry no text.
        self.tokenizer = load_tokenizer(tokenizer_path, **tokenizer_kwargs) if tokenizer_path else None
        self.max_model_len = self._resolve_max_model_len(args.max_model_len, cfg.max_position_embeddings)
        backend = jax.default_backend()
        default_seqs, default_tokens = default_batch_limits(backend)
        max_num_seqs = args.max_num_seqs or default_seqs
        max_num_batched_tokens = args.max_num_batched_tokens or default_tokens
        buckets = Buckets(max_num_batched_tokens, max_num_seqs)
        signature = repr((cfg, str(self.model.dtype), args.attention_impl, args.block_size, self.max_model_len,
                          max_num_seqs, args.tensor_parallel_size,
                          jax.tree.map(lambda x: (x.shape, str(x.dtype)), self.model.params)))
        self.runner = ModelRunner(self.model, page_size=args.block_size, max_model_len=self.max_model_len,
                                  buckets=buckets, attn_impl=args.attention_impl, kv_dtype=self.model.dtype,
                                  executable_cache=ExecutableCache(  # one process only: untried across hosts
                                      os.path.join(cache_dir, "executables") if jax.process_count() == 1 else None,
                                      signature))
        per_page = page_bytes(cfg.num_hidden_layers, args.block_size,  # on one device: its share of the heads
                              kv_heads_per_device(cfg, args.tensor_parallel_size), cfg.head_dim, self.model.dtype)
        num_pages = num_pages_for(
            override=args.num_gpu_blocks_override, kv_bytes=args.kv_cache_memory_bytes, per_page=per_page,
            backend=backend, max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
            page_size=args.block_size,
            device_budget=lambda: self.runner.kv_budget(device_free_bytes(args.gpu_memory_utilization), per_page))
        self._check_pool(num_pages, args.block_size)
        self.runner.allocate_kv_pool(num_pages)
        if self.model.mesh is not None:
            log_plan(self.model, num_pages * per_page)
        self.page_manager = PageManager(num_pages, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.page_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   args.num_scheduler_steps, self.runner.multi_step_ready.is_set,
                                   args.multi_step_with_prefill)
        self.eos_token_ids = self._eos_token_ids()
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.groups = self.output_processor.groups  # request id -> RequestGroup, live requests only
        self._in_flight: StepHandle | None = None
        atexit.register(_collect_in_flight, weakref.ref(self))
        self.beams = BeamProcessor(self.scheduler, self.runner, self.output_processor, self.max_model_len)
        self._sync_groups: set[str] = set()  # live requests with penalties or beams: their steps run synchronously
        self.counters = EngineCounters()
        self._rng = random.Random(args.seed)

    def warm_up(self, background: bool = False) -> None:
        """Compiles every step program now (the server does this before it reports ready).

        Without it, each program compiles the first time a step needs it, so an offline `generate` pays only for
        the (token, sequence) buckets its workload reaches. With `background` (the server's default), it returns
        once a set of programs that runs every step is compiled and leaves the rest (half the forward buckets,
        the multi-step decodes) to background threads: until those are done, some steps run in a larger bucket
        or as single steps (`ModelRunner.warm_up`). A multi-process group compiles everything now: its processes
        must take the same steps.

        Then, as vLLM after its warm-up, the objects alive (modules, model, programs) move to the garbage
        collector's permanent generation (`gc.freeze`, after a collection): a full collection, which would scan
        them all in the middle of some step (75-320 ms on a 2-core CPU for a small model's process), then scans
        only what requests created since.
        """
        self.runner.warm_up(self.args.num_scheduler_steps, background=background and jax.process_count() == 1)
        gc.collect()
        gc.freeze()

    def run_idle_work(self) -> float | None:
        """Work for an engine with nothing unfinished (the server calls it between requests): on a GPU, the first
        run of one program the background compile finished (`ModelRunner.idle_first_run`). Returns when to call
        again: 0 (more may be left), a wait in seconds, or None (nothing left)."""
        return None if self.has_unfinished_requests() else self.runner.idle_first_run()

    def _resolve_max_model_len(self, requested: int | None, model_max: int) -> int:
        if requested is None:
            return model_max
        if requested > model_max:
            raise ValueError(f"max_model_len={requested} is larger than the model's maximum context length "
                             f"({model_max}, max_position_embeddings); use max_model_len <= {model_max}.")
        return requested

    def _check_pool(self, num_pages: int, page_size: int) -> None:
        tokens = (num_pages - 1) * page_size
        need = -(-self.max_model_len // page_size)
        if need > num_pages - 1:
            raise ValueError(
                f"max_model_len={self.max_model_len} needs {need} KV pages of {page_size} tokens but the pool holds "
                f"only {num_pages - 1} ({tokens} tokens). Lower max_model_len to <= {tokens}, or give the pool more "
                "memory (gpu_memory_utilization, kv_cache_memory_bytes, num_gpu_blocks_override).")
        logger.info("KV cache: %d pages of %d tokens = %d tokens; maximum concurrency for %d tokens per request: "
                    "%.2fx", num_pages - 1, page_size, tokens, self.max_model_len, tokens / self.max_model_len)

    def _eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.get("eos_token_id")
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---- requests -------------------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int] | array.array]:
        """(text, token ids) of a prompt given as text, token ids, {"prompt": ...} or {"prompt_token_ids": ...}; ids
        given as such come as a C array of int64 (`_token_array`)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_array(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_name} has no tokenizer: give prompts as token ids "
                                 "({'prompt_token_ids': [...]}) or pass tokenizer=...")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_array(prompt)
        raise ValueError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def check_prompt(self, prompt: PromptType) -> CheckedPrompt:
        """The prompt tokenized and validated (ValueError if it is not valid), ready to queue."""
        if isinstance(prompt, CheckedPrompt):
            return prompt
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        return CheckedPrompt(text, token_ids.tolist() if isinstance(token_ids, array.array) else token_ids)

    def validate_prompt(self, prompt_token_ids: list[int] | array.array) -> None:
        """Raises ValueError for an empty prompt, token ids outside the vocabulary or a too-long prompt."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("The prompt is empty; give at least one token.")
        vocab = self.model.config.vocab_size
        if not isinstance(prompt_token_ids, array.array):
            prompt_token_ids = _token_array(prompt_token_ids)
        ids = np.frombuffer(prompt_token_ids, np.int64)  # [n]
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise ValueError(f"Token id {bad} is out of vocabulary (valid ids are 0..{vocab - 1}).")
        if n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has {n} "
                "tokens, leaving no room for output. Please reduce the length of the prompt.")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queues a request; raises ValueError (nothing queued) if it is invalid."""
        params = (params or SamplingParams()).clone()
        text, token_ids = self._checked_prompt(request_id, prompt, params.n, "n")
        children = []
        for i in range(params.n):
            seed = (params.seed + i) if params.seed is not None else self._rng.getrandbits(32)
            child = Request(f"{request_id}-{i}" if params.n > 1 else request_id, token_ids, params,
                            eos_token_ids=self.eos_token_ids)
            child.seed = seed & 0xFFFFFFFF
            children.append(child)
        self.output_processor.add(request_id, text, token_ids, params, children)
        if params.has_penalties:
            self._sync_groups.add(request_id)
        children[0].forks = children[1:]  # the prompt is computed once; the others fork from the first
        self.scheduler.add_request(children[0])
        self.counters.prompt_tokens += len(token_ids)

    def add_beam_request(self, request_id: str, prompt: PromptType, params: BeamSearchParams) -> None:
        """Queues a beam search of one prompt (`LLM.beam_search`); its one RequestOutput comes when it ends, with
        the best `beam_width` beams first. Raises ValueError (nothing queued) if it is invalid or cannot fit."""
        width = params.beam_width
        text, token_ids = self._checked_prompt(request_id, prompt, width, "beam_width")
        size = self.page_manager.page_size
        need = width * -(-min(len(token_ids) + params.max_tokens, self.max_model_len) // size)
        if need > self.page_manager.num_pages - 1:
            raise ValueError(f"beam_width={width} beams of up to {len(token_ids) + params.max_tokens} tokens may "
                             f"need {need} KV pages; the pool holds {self.page_manager.num_pages - 1}. Lower "
                             "beam_width or max_tokens, or give the pool more memory.")
        sampling = SamplingParams(n=width, temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True,
                                  logprobs=2 * width, output_kind=RequestOutputKind.FINAL_ONLY)
        children = beam_children(request_id, token_ids, sampling, self.eos_token_ids)
        group = self.output_processor.add(request_id, text, token_ids, sampling, children)
        group.beam = BeamState(params, len(token_ids), self.eos_token_ids)
        self.beams.add(group)
        self._sync_groups.add(request_id)
        self.scheduler.add_request(children[0])
        self.counters.prompt_tokens += len(token_ids)

    def _checked_prompt(self, request_id: str, prompt: PromptType, num_seqs: int, name: str):
        """(text, token ids) of a new request's prompt; ValueError for a used id, a bad prompt or more sequences
        than max_num_seqs."""
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_num_seqs(num_seqs, name)
        checked = self.check_prompt(prompt)
        return checked.text, checked.token_ids

    def check_num_seqs(self, num_seqs: int, name: str) -> None:
        """ValueError when one request would run more sequences at once (`name`: "n" or "beam_width") than
        max_num_seqs."""
        if num_seqs > self.scheduler.max_num_seqs:
            raise ValueError(f"{name}={num_seqs} runs {num_seqs} sequences at once, more than "
                             f"max_num_seqs={self.scheduler.max_num_seqs}; lower {name} or raise max_num_seqs.")

    def abort_request(self, request_ids) -> None:
        """Stops requests wherever they are and frees their pages; unknown ids are ignored."""
        for request_id in request_ids:
            group = self.groups.pop(request_id, None)
            self._sync_groups.discard(request_id)
            self.beams.discard(request_id)
            for child in group.children if group else []:
                if not child.finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or self._in_flight is not None

    # ---- stepping -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and launches one step, then processes the previous one (async) or this one (sync); returns
        the outputs of the requests that progressed."""
        outputs = []
        if self._in_flight is not None and self._sync_groups:
            outputs = self._process(self._in_flight)  # penalties need every token on the host first
            self._in_flight = None
        sched = self.scheduler.schedule()
        for victim in sched.preempted:
            self.runner.remove_request(victim.request_id)
        launched = self.runner.launch(sched, self.page_manager.pages_of) if sched.requests else None
        if self._in_flight is not None:
            outputs += self._process(self._in_flight)
        self._in_flight = launched
        if launched is not None and not (self.args.async_scheduling and not self._sync_groups):
            outputs += self._process(launched)
            self._in_flight = None
        return outputs

    def _process(self, handle: StepHandle) -> list[RequestOutput]:
        try:
            outs = handle.result()
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() > 1:
                raise distributed.peer_failure(e) from e
            raise
        outputs = self.output_processor.process(handle.sched, outs, self._on_tokens, self._finish,
                                                (handle.prompt_chunks, handle.prompt_result()))
        if self.beams.groups:
            outputs += self.beams.process(handle.sched, outs[0], self._finish)
        for out in outputs:
            if out.finished:
                self._sync_groups.discard(out.request_id)
                self.counters.num_requests_finished += 1
        return outputs

    def _on_tokens(self, arrived: ArrivedTokens) -> None:
        self.runner.append_tokens(arrived)
        self.counters.generation_tokens += int(arrived.counts.sum())

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.runner.remove_request(req.request_id)

    # ---- metrics --------------------------------------------------------------------------------------------

    def get_metrics(self) -> list[Gauge | Counter]:
        """vLLM-named gauges and counters of the engine's state; jaxpaged's pages saved by sharing (page
        references beyond the first: prefix hits and forks) and padding counters (tokens and sequence rows the
        steps ran, and what their bucket shapes added)."""
        stats, padding = self.page_manager.stats, self.runner.padding
        return [
            Gauge("vllm:num_requests_running", len(self.scheduler.running)),
            Gauge("vllm:num_requests_waiting", len(self.scheduler.waiting)),
            Gauge("vllm:kv_cache_usage_perc", self.page_manager.usage),
            Gauge("jaxpaged:kv_pages_shared", self.page_manager.num_shared_refs),
            Counter("vllm:num_preemptions", self.scheduler.num_preemptions),
            Counter("vllm:prefix_cache_queries", stats.queries),
            Counter("vllm:prefix_cache_hits", stats.hits),
            Counter("vllm:prompt_tokens", self.counters.prompt_tokens),
            Counter("vllm:generation_tokens", self.counters.generation_tokens),
            Counter("vllm:request_success", self.counters.num_requests_finished),
            Counter("jaxpaged:step_tokens", padding.tokens),
            Counter("jaxpaged:step_padding_tokens", padding.padding_tokens),
            Counter("jaxpaged:step_rows", padding.rows),
            Counter("jaxpaged:step_padding_rows", padding.padding_rows),
        ]
