"""ModelRunner: the persistent batch on the host, the page pool and page tables on the device, and the jitted steps.

A step is two compiled programs launched back to back without waiting: the forward pass (one per (T, S) token x
sequence bucket) returns the last hidden state of each sequence, and the sampler (one per sequence bucket and
`SamplerFlags`) computes logits, samples, and stores each sampled id in `slot_tokens[slot]`, where the next step
reads the ids it has not received yet. Sampling variants thus multiply only the small sampler programs, not the
forward buckets. A multi-step decode (the scheduler's `num_steps > 1`) is one program per sequence bucket and
flags that runs the decode steps in a loop on the device; in a multi-step with prefills (`with_prefill`) the
forward pass and sampler run first, and the same program continues the decode rows from their sampled ids.
Steps with prompt logprobs run a third program (one per token bucket) on every token's hidden state; steps that
fork or write into shared pages first run the page copies. Results are copied to the host asynchronously;
`StepHandle.result()` waits for them.
"""

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxpaged.background_compile import BackgroundCompiler, background_order, in_ready_set, wider_key
from jaxpaged.buckets import Buckets
from jaxpaged.compile_memory import CompileMemory, autotune_bytes
from jaxpaged.executable_cache import ExecutableCache
from jaxpaged.first_runs import RUN_ONCE_PLATFORMS, run_once
from jaxpaged.input_batch import ArrivedTokens, InputBatch, StepLayout
from jaxpaged.kv_pool import device_unused_bytes
from jaxpaged.metrics import PaddingStats
from jaxpaged.models import LoadedModel
from jaxpaged.models.sharding import pool_sharding, replicated
from jaxpaged.prompt_logprobs import PromptChunk, prompt_chunks, prompt_targets
from jaxpaged.request import Request
from jaxpaged.sampler import SamplerFlags, SamplerOutput
from jaxpaged.sampling_batch import SamplingBatch, pad_rows
from jaxpaged.scheduler_output import SchedulerOutput
from jaxpaged.step_programs import (BANNED_MIN, PROMPT_CHUNK, compiler_options, copy_pages, decode_steps,
                                    forward_step, prompt_logprobs_step, sample_step, split_steps, update_tables)

logger = logging.getLogger(__name__)

_UPDATE_CHUNK = 512  # page-table entries a step program applies; more go first through the update program
_COPY_CHUNK = 32  # copy-on-write page copies per call, likewise
_BOUND_SHARE = 0.05  # the most of the free memory `kv_budget` reserves for activations without measuring first


@dataclasses.dataclass
class StepHandle:
    """A launched step: what was scheduled and its sampled ids on their way to the host."""

    sched: SchedulerOutput
    out: SamplerOutput  # device arrays, rows in scheduling order ([K, S, ...] for a K-step decode)
    prompt_chunks: list[PromptChunk] = dataclasses.field(default_factory=list)
    prompt_out: SamplerOutput | None = None  # [T, ...] logprobs of the prompt tokens that `prompt_chunks` score
    # a multi-step with prefills: the scheduled rows that decoded on, and their [K, R, ...] outputs
    decode_rows: list[int] = dataclasses.field(default_factory=list)
    decode_out: SamplerOutput | None = None

    def start_copies(self) -> None:
        """Starts the copies of what `result` and `prompt_result` read to the host."""
        for leaf in jax.tree.leaves((self.out, self.decode_out, self.prompt_out)):
            leaf.copy_to_host_async()

    def result(self) -> list[SamplerOutput]:
        """Each sub-step's sampled ids and logprobs as NumPy arrays, rows in scheduling order (one sub-step unless
        the step is a multi-step decode; waits for the device)."""
        out = self._host(self.out)
        if self.decode_out is not None:  # the forward pass's sub-step, then the decode rows' K more
            rows, num_rows = np.asarray(self.decode_rows), out.token_ids.shape[0]
            return [out] + [jax.tree.map(functools.partial(_at_rows, rows, num_rows), d)
                            for d in split_steps(self._host(self.decode_out))]
        return split_steps(out) if self.sched.num_steps > 1 else [out]

    @staticmethod
    def _host(out: SamplerOutput) -> SamplerOutput:
        """`out` on the host; a step without logprobs returned its ids alone."""
        return jax.device_get(out) if out.logprobs is not None else SamplerOutput(np.asarray(out.token_ids))

    def prompt_result(self) -> SamplerOutput | None:
        """The prompt logprobs as NumPy arrays (None when no row asked for them)."""
        return None if self.prompt_out is None else jax.device_get(self.prompt_out)


class ModelRunner:
    """Owns the page pool, the device page tables and the compiled programs; one forward per bucket shape."""

    def __init__(self, model: LoadedModel, *, page_size: int, max_model_len: int, buckets: Buckets,
                 attn_impl: str, kv_dtype, executable_cache: ExecutableCache | None = None):
        self.model = model
        self.page_size = page_size
        self.buckets = buckets
        self.kv_dtype = kv_dtype
        self.max_pages_per_seq = -(-max_model_len // page_size)
        num_slots = buckets.max_num_seqs
        self.batch = InputBatch(num_slots, max_model_len, page_size)
        self.sampling = SamplingBatch(num_slots)
        self._min_tokens = np.zeros(num_slots + 1, np.int32)
        self._penalties = np.zeros(num_slots + 1, bool)
        self._prompt_logprobs = np.zeros(num_slots + 1, bool)
        self.kv_caches = None
        # with a tensor-parallel mesh: host inputs, page tables and sampled ids on every device, the pool split
        self._replicated, self._pool_sharding = replicated(model.mesh), pool_sharding(model.mesh)
        self.page_tables = jnp.zeros((num_slots + 1, self.max_pages_per_seq), jnp.int32, device=self._replicated)
        self.slot_tokens = jnp.zeros(num_slots + 1, jnp.int32, device=self._replicated)
        self._platform = next(iter(self.slot_tokens.devices())).platform
        self._copy_ahead = self._platform != "cpu"
        self.attn_impl = attn_impl
        self.executable_cache = executable_cache or ExecutableCache(None, "")
        self.forward_fn = self._jit(functools.partial(forward_step, model, attn_impl, page_size), (1, 2), "prrr")
        self.prompt_fn = self._jit(functools.partial(prompt_logprobs_step, model), (), "r")
        self.update_fn = self._jit(update_tables, (0,), "r")
        self.copy_fn = self._jit(copy_pages, (0,), "p")
        self.executables: dict[tuple, jax.stages.Compiled] = {}  # program key -> compiled program
        self.compile_memory = CompileMemory()  # bounded once the pool exists (`allocate_kv_pool`)
        self._reserved = 0  # bytes `kv_budget` kept free for the steps' activations
        self.multi_step_ready = threading.Event()  # cleared while multi-step decodes compile in the background
        self.multi_step_ready.set()
        self._background: BackgroundCompiler | None = None
        self._ran: set[tuple] = set()  # programs run once at warm-up, when idle, or compiled on first use in a step
        self.padding = PaddingStats()

    # ---- memory and compilation -----------------------------------------------------------------------------

    def _jit(self, fn, donate: tuple[int, ...], outs: str):
        """jax.jit of a step function; with a mesh its outputs get fixed shardings, one letter per output: "p"
        the pool's, "r" replicated (so that one program's outputs are the next one's expected inputs)."""
        if self._replicated is None:
            return jax.jit(fn, donate_argnums=donate)
        shardings = tuple(self._pool_sharding if o == "p" else self._replicated for o in outs)
        return jax.jit(fn, donate_argnums=donate, out_shardings=shardings if len(shardings) > 1 else shardings[0])

    def zeros_as_output(self, shape: tuple[int, ...], dtype) -> jax.Array:
        """Zeros placed as a program's output reaches the next program: replicated over the mesh (committed; as the
        pool, also across processes), or on one device, uncommitted as unsharded programs' outputs are. A call with
        an input placed otherwise than in its program's steps misses jax's fast dispatch path once (0.5-0.8 ms on
        a CPU)."""
        return jnp.zeros(shape, dtype, device=self._replicated)

    def _spec(self, shape, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        """An input of a program being lowered (replicated over the mesh, if any)."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def _pool_shape(self, num_pages: int) -> tuple[int, int, int, int]:
        cfg = self.model.config
        return (num_pages, self.page_size, cfg.num_key_value_heads, cfg.head_dim)

    def allocate_kv_pool(self, num_pages: int) -> None:
        """Allocates the per-layer (K, V) page arrays, [num_pages, page_size, num_kv_heads, head_dim] each."""
        shape = self._pool_shape(num_pages)
        self.kv_caches = [(jnp.zeros(shape, self.kv_dtype, device=self._pool_sharding),
                           jnp.zeros(shape, self.kv_dtype, device=self._pool_sharding))
                          for _ in range(self.model.config.num_hidden_layers)]
        unused = self._gpu_unused_bytes()
        if unused is not None:  # compiles from now on share what the pool and the activations leave free
            capacity = max(unused - self._reserved, 1)  # 1: one compile at a time
            self.compile_memory.limit(capacity)
            logger.info("Compiles may take %.2f GiB at once for XLA's autotuning.", capacity / 2**30)

    @staticmethod
    def _gpu_unused_bytes() -> int | None:
        """Device memory JAX has not handed out, on a GPU (where XLA autotunes GEMMs in it); None elsewhere."""
        return device_unused_bytes() if jax.default_backend() == "gpu" else None

    def kv_budget(self, free_bytes: int, per_page: int) -> int:
        """Bytes for the pool on an accelerator: `free_bytes` minus the activation peak, the temporary memory of
        the largest forward bucket and the largest sampler, measured by compiling them (vLLM's profiling run).

        The forward program is compiled against the pool it will run with, sized first for a generous bound of
        its peak (`_activation_bound`, when that costs the pool at most `_BOUND_SHARE` of `free_bytes`); when
        the measured peak fits the bound, that pool is kept (smaller than it could be by bound - peak) and the
        program is the bucket's, so the largest forward compiles once. Otherwise, or on a small device, the
        program is compiled against a 2-page pool first and the bucket compiles again for the real pool.
        """
        num_tokens, num_seqs = max(self.buckets.all_shapes())
        sampler_key = ("sample", num_seqs, SamplerFlags(True, True, True), 1, BANNED_MIN)
        sampler = self.executables[sampler_key] = self._compile(sampler_key)[1]
        sampler_peak = sampler.memory_analysis().temp_size_in_bytes
        bound = max(self._activation_bound(num_tokens), sampler_peak)
        pages = (free_bytes - bound) // per_page if bound <= _BOUND_SHARE * free_bytes else 2
        key = ("forward", num_tokens, num_seqs)
        forward = self._compile(key, self._pool_specs(max(pages, 2)))[1]
        peak = max(forward.memory_analysis().temp_size_in_bytes, sampler_peak)
        reserved = self._reserved = bound if pages > 2 and peak <= bound else peak
        kv = free_bytes - reserved
        if kv // per_page == pages:
            self.executables[key] = forward
        logger.info("Activation peak %.2f GiB (%.2f GiB reserved); KV pool %.2f GiB.", peak / 2**30,
                    reserved / 2**30, max(kv, 0) / 2**30)
        return int(kv)

    def _activation_bound(self, num_tokens: int) -> int:
        """A generous bound of a forward program's temporary memory: every per-token intermediate of one layer
        (hidden and norm states, q/k/v, the MLP's gate, up and product) at 4 bytes each, twice over."""
        c = self.model.config
        return 2 * 4 * num_tokens * (4 * c.hidden_size + 2 * c.intermediate_size + c.qkv_width)

    def _pool_specs(self, num_pages: int) -> list[tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
        """A pool of `num_pages` to lower programs against before it exists."""
        page = jax.ShapeDtypeStruct(self._pool_shape(num_pages), self.kv_dtype, sharding=self._pool_sharding)
        return [(page, page)] * self.model.config.num_hidden_layers

    def _lower_forward(self, num_tokens: int, num_seqs: int, caches=None):
        return self.forward_fn.lower(self.model.params, caches or self.kv_caches, self.page_tables, self.slot_tokens,
                                     self._spec((num_tokens,)), self._spec((4 * num_seqs + 2,)),
                                     self._spec((3, _UPDATE_CHUNK)))

    def _lower_sample(self, num_seqs: int, flags: SamplerFlags, penalty_width: int, banned_width: int):
        fn = self._jit(functools.partial(sample_step, self.model, flags), (1,), "rr")
        hidden = self._spec((num_seqs, self.model.config.hidden_size), self.model.dtype)
        spec = self._spec
        return fn.lower(self.model.params, self.slot_tokens, hidden, spec((6, num_seqs), jnp.float32),
                        spec((5, num_seqs)), spec((num_seqs, penalty_width)), spec((num_seqs, banned_width)))

    def _lower_decode(self, num_seqs: int, num_steps: int, flags: SamplerFlags):
        fn = self._jit(functools.partial(decode_steps, self.model, self.attn_impl, self.page_size, flags, num_steps),
                       (1, 2, 3), "prrr")
        spec = self._spec
        return fn.lower(self.model.params, self.kv_caches, self.page_tables, self.slot_tokens, spec((num_seqs,)),
                        spec((4 * num_seqs + 2,)), spec((6, num_seqs), jnp.float32), spec((5, num_seqs)),
                        spec((3, _UPDATE_CHUNK)))

    def _lower_prompt(self, num_tokens: int):
        hidden = self._spec((num_tokens, self.model.config.hidden_size), self.model.dtype)
        return self.prompt_fn.lower(self.model.params, hidden, self._spec((num_tokens,)))

    def _compile(self, key: tuple, caches=None) -> tuple[tuple, jax.stages.Compiled]:
        """(key, the compiled program `key`), from the executable cache when it has it; a forward against
        `caches` (shapes) when given, else against the pool."""
        kind, *shape = key
        lower = {"forward": functools.partial(self._lower_forward, caches=caches), "sample": self._lower_sample,
                 "decode": self._lower_decode,
                 "update": lambda: self.update_fn.lower(self.page_tables, self._spec((3, _UPDATE_CHUNK))),
                 "copy": lambda: self.copy_fn.lower(self.kv_caches, self._spec((2, _COPY_CHUNK))),
                 "prompt": self._lower_prompt}[kind]
        pool = (caches or self.kv_caches)[0][0].shape if kind in ("forward", "decode", "copy") else None

        def build() -> jax.stages.Compiled:
            start = time.perf_counter()
            lowered = lower(*shape)
            lowered_at = time.perf_counter()
            compile_fn = functools.partial(lowered.compile, compiler_options=compiler_options(jax.default_backend()))
            program = self.compile_memory.compile(compile_fn, self._autotune_bytes(key), f"step program {key}")
            logger.debug("Step program %s: traced and lowered in %.2f s, compiled in %.2f s", key,
                         lowered_at - start, time.perf_counter() - lowered_at)
            return program

        return key, self.executable_cache.get((*key, pool), build)

    def _autotune_bytes(self, key: tuple) -> int:
        return autotune_bytes(self.model.config, key, np.dtype(self.model.dtype).itemsize, PROMPT_CHUNK)

    def warm_up(self, num_decode_steps: int = 1, background: bool = False) -> None:
        """Compiles (or loads from the persistent cache) every forward bucket, the sampler variants of every
        sequence bucket, the page-table update, the page copy and, with `num_decode_steps > 1`, the multi-step
        decode of every sequence bucket and sampler variant, in up to 8 threads (XLA compiles outside the GIL).

        With `background`, only a set that can run every step is compiled before this returns: the forward
        programs of every other token bucket from the top (`Buckets.first_token_sizes`: a step runs in the
        smallest compiled bucket that holds it, with at most 2x its tokens), two samplers per sequence bucket
        (random sampling and logprobs on, filters on or off: `_stand_in`), the update and the copy. The other
        forward buckets and samplers and the multi-step decodes compile in background threads and are used as
        each one is done (`background_order`): first the multi-step decodes of the two samplers above, after
        which steps may be multi-step (`multi_step_ready`; a decode whose own sampler is not compiled yet runs with
        the wider one, as single steps do), then the other forward buckets, samplers and decodes. Outputs do not
        depend on which program runs a step. Sampler programs for penalty windows or long banned-token lists, and
        the prompt-logprob programs, compile on first use.
        """
        keys = [("forward", t, s) for t, s in self.buckets.all_shapes()]
        keys += [("sample", s, f, 1, BANNED_MIN) for s in self.buckets.seq_sizes for f in SamplerFlags.all()]
        if num_decode_steps > 1:
            keys += [("decode", s, num_decode_steps, f) for s in self.buckets.seq_sizes for f in SamplerFlags.all()]
        keys += [("update",), ("copy",)]
        keys = [k for k in keys if k not in self.executables]  # the programs `kv_budget` compiled are kept
        now = [k for k in keys if not background or in_ready_set(k, self.buckets.first_token_sizes)]
        later = sorted((k for k in keys if k not in now), key=background_order)
        self._compile_all(now, "Compiling step programs")
        if self._platform in RUN_ONCE_PLATFORMS:
            self._run_each_once()
        if later:
            self.multi_step_ready.clear()
            first = [k for k in later if background_order(k) == 0]
            self._background = BackgroundCompiler(self, later, first, self.multi_step_ready.set)

    def _compile_all(self, keys: list[tuple], desc: str) -> None:
        workers = max(1, min(len(keys), os.cpu_count() or 1, 8))  # 16 were no faster on the H200 (RESULTS.md)
        start, hits = time.perf_counter(), self.executable_cache.hits
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
                tqdm(total=len(keys), desc=desc, unit="program") as bar:
            for future in concurrent.futures.as_completed([pool.submit(self._compile, k) for k in keys]):
                key, executable = future.result()
                self.executables[key] = executable
                bar.update(1)
        logger.info("Compiled %d step programs with %d threads in %.1f s (%d loaded from the executable cache).",
                    len(keys), workers, time.perf_counter() - start, self.executable_cache.hits - hits)
        unused = self._gpu_unused_bytes()
        if unused is not None:
            logger.info("Device memory left to JAX after compiling: %.2f GiB.", unused / 2**30)

    def _run_each_once(self) -> None:
        """Runs every compiled program once before the first request (`first_runs`: a GPU program's first run
        records its CUDA graphs), so that no step of a workload pays for it."""
        start = time.perf_counter()
        for key in sorted(self.executables, key=repr):  # one order in every process of a group (collectives)
            self._run_first(key)
        jax.block_until_ready((self.kv_caches, self.page_tables, self.slot_tokens))
        logger.info("Ran each of %d step programs once in %.1f s.", len(self.executables),
                    time.perf_counter() - start)

    def idle_first_run(self) -> float | None:
        """For an idle engine (no step in flight), on a GPU: runs once one program that the background compile
        finished and no step has run yet (`first_runs`), so that its first run's host time (~25-40 ms: XLA records
        its CUDA graphs) falls between requests instead of into a step. Returns when to call again: 0 after a run,
        0.5 s while the background compile goes on, None when there is nothing left to run (and off GPU, or in a
        group of processes, which must run the same programs in the same order)."""
        if self._platform not in RUN_ONCE_PLATFORMS or jax.process_count() > 1:
            return None
        key = next((k for k in list(self.executables) if k not in self._ran), None)  # list(): compile threads add
        if key is not None:
            self._run_first(key)
            return 0.0
        return 0.5 if self._background is not None and not self._background.done else None

    def _run_first(self, key: tuple) -> None:
        """The first run of compiled program `key`, outside any step (`first_runs.run_once`), recorded in `_ran`."""
        run_once(self, key, self.executables[key])
        self._ran.add(key)

    def wait_for_background(self) -> None:
        """Blocks until the programs `warm_up(background=True)` left to background threads are compiled."""
        if self._background is not None:
            self._background.join()

    def _program(self, key: tuple) -> jax.stages.Compiled:
        program = self.executables.get(key)
        if program is None:
            logger.info("Compiling a step program on first use: %s", key)
            program = self.executables[key] = self._compile(key)[1]
            self._ran.add(key)  # by the step about to run it
        return program

    # ---- requests in the persistent batch --------------------------------------------------------------------

    def remove_request(self, request_id: str) -> None:
        """Frees a finished, aborted or preempted request's slot."""
        self.batch.remove(request_id)

    def rewrite_request(self, req: Request) -> None:
        """Mirrors a request whose outputs and pages were replaced (beam search) in the persistent batch."""
        self.batch.rewrite(req)

    def append_tokens(self, arrived: ArrivedTokens) -> None:
        """Records arrived output tokens in the requests' rows of the persistent batch."""
        self.batch.append_tokens(arrived)

    def _add_request(self, req: Request) -> int:
        """Gives `req` a slot in the persistent batch and sets its sampling parameters there; returns the slot."""
        slot = self.batch.add(req)
        p = req.sampling_params
        self.sampling.set(slot, p, req.seed, req.num_prompt_tokens)
        self._min_tokens[slot] = p.min_tokens
        self._penalties[slot] = p.has_penalties
        self._prompt_logprobs[slot] = p.prompt_logprobs is not None
        return slot

    # ---- stepping -------------------------------------------------------------------------------------------

    def launch(self, sched: SchedulerOutput, pages_of) -> StepHandle:
        """Sends the step's inputs and launches it; returns at once (the sampled ids arrive later).

        The copies of its results to the host start now, except on CPU: there the host reads the device buffers
        in place, and a copy whose completion callback (it takes the GIL) runs while the interpreter finalizes
        aborts the process."""
        handle = self._launch(sched, pages_of)
        if self._copy_ahead:
            handle.start_copies()
        return handle

    def _launch(self, sched: SchedulerOutput, pages_of) -> StepHandle:
        slots = self.batch.slots(sched.requests)  # [R]
        for i in np.flatnonzero(slots < 0).tolist():  # admitted in this step
            slots[i] = self._add_request(sched.requests[i])
        for f in sched.forks:
            self._add_request(f.child)
        self._copy_pages(sched.copies)
        updates = self._table_updates(self.batch.page_updates(sched, slots, pages_of))
        if sched.num_steps > 1 and not sched.with_prefill:
            return self._launch_decode(sched, slots, self.buckets.num_seqs(len(sched.requests)), updates)
        num_tokens, num_seqs = self._forward_shape(sched.num_tokens, len(sched.requests) + len(sched.forks))
        self.padding.record(sched.num_tokens, num_tokens, len(sched.requests), num_seqs)
        lay = self.batch.layout(sched, slots, num_tokens, num_seqs)
        seq_ints = np.concatenate([lay.cu_q_lens, lay.kv_lens, lay.slots, lay.last_rows,
                                   np.array([lay.num_seqs], np.int32)])
        forward = self._program(("forward", num_tokens, num_seqs))
        self.kv_caches, self.page_tables, hidden, hidden_all = forward(
            self.model.params, self.kv_caches, self.page_tables, self.slot_tokens, lay.token_ids, seq_ints, updates)
        chunks = prompt_chunks(sched, lay.cu_q_lens) if self._prompt_logprobs[lay.slots].any() else []
        prompt_out = None
        if chunks:
            prompt_out = self._program(("prompt", num_tokens))(self.model.params, hidden_all,
                                                               prompt_targets(chunks, num_tokens))
        floats, ints = self._sampling_inputs(lay)
        penalty, banned = self._token_lists(sched, lay)
        flags = self.sampling.flags(lay.row_slots)
        sampler = self._program(self._stand_in(("sample", num_seqs, flags, penalty.shape[1], banned.shape[1])))
        self.slot_tokens, out = sampler(self.model.params, self.slot_tokens, hidden, floats, ints, penalty, banned)
        handle = StepHandle(sched, out, chunks, prompt_out)
        if sched.with_prefill:
            handle.decode_rows, handle.decode_out = self._launch_decode_rows(sched, slots)
        return handle

    def _launch_decode_rows(self, sched: SchedulerOutput, slots: np.ndarray) -> tuple[list[int], SamplerOutput]:
        """The multi-step decode after a forward pass with prefills: each decode row (`steps` > 1) runs its other
        `steps - 1` tokens from the token that pass sampled (on the device, in `slot_tokens`). Returns those rows
        and the decode's outputs."""
        rows = np.flatnonzero(sched.steps > 1)  # [D]
        ones = np.ones(len(rows), np.int64)
        decodes = SchedulerOutput([sched.requests[i] for i in rows.tolist()], sched.starts[rows] + 1, ones,
                                  ones.astype(bool), sched.steps[rows] - 1, sched.num_pages[rows],
                                  num_steps=sched.num_steps)
        return rows.tolist(), self._launch_decode(decodes, slots[rows], self.buckets.num_seqs(len(rows)),
                                                  self.no_table_updates()).out  # the forward pass applied them

    def _forward_shape(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The step's bucket, or while forward programs compile in the background, the smallest compiled one that
        holds it (the top bucket always is)."""
        shape = self.buckets.shape(num_tokens, num_seqs)
        if self._background is None or ("forward", *shape) in self.executables:
            return shape
        return min((k[1], k[2]) for k in list(self.executables)
                   if k[0] == "forward" and k[1] >= shape[0] and k[2] >= shape[1])

    def _stand_in(self, key: tuple) -> tuple:
        """A sampler or multi-step decode program's key, or while programs compile in the background and that one
        is not compiled yet, its compiled stand-in (`wider_key`: same tokens)."""
        if self._background is None or key in self.executables:
            return key
        wider = wider_key(key)
        return wider if wider in self.executables else key

    def _launch_decode(self, sched: SchedulerOutput, slots: np.ndarray, num_seqs: int,
                       updates: np.ndarray) -> StepHandle:
        """A multi-step decode: every scheduled row is a one-token decode that runs `steps` sub-steps (the
        scheduler leaves rows with penalties or min_tokens ahead to single steps); `slots` of its rows, `updates`
        as `_table_updates` returns them."""
        lay = self.batch.layout(sched, slots, num_seqs, num_seqs)
        steps = np.zeros(num_seqs, np.int32)
        steps[:lay.num_seqs] = sched.steps
        sub_steps = int(steps.sum())  # one token per live row and sub-step
        self.padding.record(sub_steps, num_seqs * sched.num_steps, sub_steps, num_seqs * sched.num_steps)
        seq_ints = np.concatenate([lay.cu_q_lens, lay.kv_lens, lay.slots, steps, np.array([lay.num_seqs], np.int32)])
        floats, ints = self._sampling_inputs(lay)
        flags = self.sampling.flags(lay.row_slots)
        program = self._program(self._stand_in(("decode", num_seqs, sched.num_steps, flags)))
        self.kv_caches, self.page_tables, self.slot_tokens, out = program(
            self.model.params, self.kv_caches, self.page_tables, self.slot_tokens, lay.token_ids, seq_ints, floats,
            ints, updates)
        return StepHandle(sched, out)

    def _sampling_inputs(self, lay: StepLayout) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's floats [6, S] and ints [5, S]: the rows' parameters, then the slot each id is stored in."""
        floats, ints = self.sampling.gather(lay.row_slots, lay.positions)
        return floats, np.concatenate([ints, lay.sample_slots[None]])

    def _copy_pages(self, copies) -> None:
        """Launches the step's copy-on-writes (before its forward pass, in device order)."""
        for at in range(0, len(copies), _COPY_CHUNK):
            self.kv_caches = self._program(("copy",))(self.kv_caches, self.copy_chunk(copies[at:at + _COPY_CHUNK]))

    def copy_chunk(self, part) -> np.ndarray:
        """The copy program's [2, _COPY_CHUNK] (src, dst) pages of up to _COPY_CHUNK `PageCopy`s; padding has its
        dst out of range (dropped)."""
        chunk = np.zeros((2, _COPY_CHUNK), np.int32)
        chunk[1] = self.kv_caches[0][0].shape[0]
        chunk[0, :len(part)] = [c.src for c in part]
        chunk[1, :len(part)] = [c.dst for c in part]
        return chunk

    def no_table_updates(self) -> np.ndarray:
        """A step program's page-table chunk without entries (padding only: `_table_updates`)."""
        return self._table_updates(np.zeros((3, 0), np.int32))

    def _table_updates(self, updates: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """The step program's chunk [3, _UPDATE_CHUNK] of page-table entries (slots, columns, page ids; padding
        targets the pad row): the last `_UPDATE_CHUNK` or fewer. Chunks before it (large admissions) go through
        the update program now, so they land first."""
        rows, cols, vals = updates
        chunks = []
        for at in range(0, max(len(rows), 1), _UPDATE_CHUNK):  # one chunk at least, padding only if no entry
            chunk = np.zeros((3, _UPDATE_CHUNK), np.int32)
            chunk[0] = self.batch.pad_slot
            n = min(_UPDATE_CHUNK, len(rows) - at)
            chunk[0, :n], chunk[1, :n], chunk[2, :n] = rows[at:at + n], cols[at:at + n], vals[at:at + n]
            chunks.append(chunk)
        for chunk in chunks[:-1]:
            self.page_tables = self._program(("update",))(self.page_tables, chunk)
        return chunks[-1]

    def _token_lists(self, sched: SchedulerOutput, lay: StepLayout) -> tuple[np.ndarray, np.ndarray]:
        """Penalty windows [S, W] (prompt + outputs; W = 1 when no row has penalties) and banned ids [S, K]
        (EOS and stop ids before min_tokens) of the sampler rows (scheduled requests, then forks). Built per row
        only in the rare steps that need them.

        NOTE: penalties read the request's tokens on the host, so the engine runs such steps synchronously.
        """
        num_seqs, slots = lay.slots.shape[0], lay.row_slots
        n = len(sched.requests) + len(sched.forks)
        penalized = self._penalties[slots].any()
        banning = (lay.positions[:n] < self._min_tokens[slots[:n]]).any()
        penalty = np.full((num_seqs, 1), -1, np.int32)
        banned = np.full((num_seqs, BANNED_MIN), -1, np.int32)
        if penalized or banning:
            requests = sched.requests + [f.child for f in sched.forks]
            if penalized:
                penalty = pad_rows([r.token_ids(0, r.num_known_tokens) if r.sampling_params.has_penalties else []
                                    for r in requests], num_seqs, 64)
            if banning:
                banned = pad_rows([_banned(r, int(lay.positions[i])) for i, r in enumerate(requests)], num_seqs,
                                  BANNED_MIN)
        return penalty, banned


def _at_rows(rows: np.ndarray, num_rows: int, x: np.ndarray) -> np.ndarray:
    """`x` [R, ...] (R >= len(rows)) placed at `rows` of a zero array [num_rows, ...]."""
    placed = np.zeros((num_rows, *x.shape[1:]), x.dtype)
    placed[rows] = x[:len(rows)]
    return placed


def _banned(req: Request, position: int) -> list[int]:
    p = req.sampling_params
    if position >= p.min_tokens:
        return []
    return sorted(req.stop_ids)
