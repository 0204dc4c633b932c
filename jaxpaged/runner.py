"""ModelRunner: turns a SchedulerOutput into padded flat arrays and runs one jitted forward + sample step."""

import concurrent.futures
import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxpaged.buckets import Buckets
from jaxpaged.models import AttentionMetadata, LoadedModel
from jaxpaged.sampler import SamplerOutput, SamplingTensors, sample
from jaxpaged.sampling_batch import HostSampling
from jaxpaged.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInput:
    """A padded ragged batch: T tokens of S sequences."""

    token_ids: jax.Array       # [T] int32
    md: AttentionMetadata
    logits_indices: jax.Array  # [S] int32  last new token of each sequence


def _step(model: LoadedModel, attn_impl: str, params, kv_caches, inp: ModelInput, st: SamplingTensors):
    """forward -> logits of each sequence's last token -> sample; the page pool is donated and updated in place."""
    hidden, kv_caches = model.forward(params, inp.token_ids, inp.md, kv_caches, attn_impl=attn_impl)
    logits = model.compute_logits(params, hidden[inp.logits_indices])  # [S, V] f32
    return kv_caches, sample(logits, st)


def _bucket_key(inp: ModelInput, st: SamplingTensors) -> tuple:
    return (inp.token_ids.shape[0], inp.logits_indices.shape[0], st.penalty_tokens.shape[1],
            st.banned_tokens.shape[1])


class ModelRunner:
    """Owns the page pool on device and the jitted step; one compiled program per bucket shape."""

    def __init__(self, model: LoadedModel, *, page_size: int, max_model_len: int, buckets: Buckets,
                 attn_impl: str, kv_dtype):
        self.model = model
        self.page_size = page_size
        self.buckets = buckets
        self.kv_dtype = kv_dtype
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.kv_caches = None
        self.step_fn = jax.jit(functools.partial(_step, model, attn_impl), donate_argnums=(1,))
        self.executables: dict[tuple, jax.stages.Compiled] = {}  # bucket key -> compiled step

    def _pool_shape(self, num_pages: int) -> tuple[int, int, int, int]:
        cfg = self.model.config
        return (num_pages, self.page_size, cfg.num_key_value_heads, cfg.head_dim)

    def allocate_kv_pool(self, num_pages: int) -> None:
        """Allocates the per-layer (K, V) page arrays, [num_pages, page_size, num_kv_heads, head_dim] each."""
        shape = self._pool_shape(num_pages)
        self.kv_caches = [(jnp.zeros(shape, self.kv_dtype), jnp.zeros(shape, self.kv_dtype))
                          for _ in range(self.model.config.num_hidden_layers)]

    def activation_bytes(self) -> int:
        """Temporary memory of the largest bucket's compiled step (compiled against a 2-page pool)."""
        page = jax.ShapeDtypeStruct(self._pool_shape(2), self.kv_dtype)
        caches = [(page, page)] * self.model.config.num_hidden_layers
        num_tokens, num_seqs = max(self.buckets.all_shapes())
        inp, st = self._null_batch(num_tokens, num_seqs)
        compiled = self.step_fn.lower(self.model.params, caches, inp, st).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def warm_up(self) -> None:
        """Compiles (or loads from the persistent cache) every bucket shape, in parallel threads.

        XLA compiles outside the GIL, so bucket programs build concurrently; each is kept as an executable keyed
        by its shapes and called directly, so a step never traces or compiles after warm-up.
        """
        shapes = self.buckets.all_shapes()
        workers = max(1, min(len(shapes), os.cpu_count() or 1, 8))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
                tqdm(total=len(shapes), desc="Compiling step buckets", unit="bucket") as bar:
            futures = [pool.submit(self._compile, *shape) for shape in shapes]
            for future in concurrent.futures.as_completed(futures):
                key, executable = future.result()
                self.executables[key] = executable
                bar.update(1)
        logger.info("Compiled %d step buckets (tokens x seqs) with %d threads.", len(shapes), workers)

    def _compile(self, num_tokens: int, num_seqs: int) -> tuple[tuple, jax.stages.Compiled]:
        inp, st = self._null_batch(num_tokens, num_seqs)
        return _bucket_key(inp, st), self.step_fn.lower(self.model.params, self.kv_caches, inp, st).compile()

    def execute(self, sched: SchedulerOutput, page_tables: list[list[int]], sampling: HostSampling) -> SamplerOutput:
        """Runs one step; returns the sampled ids and logprobs as numpy arrays (rows = scheduled requests)."""
        inp = self._prepare_input(sched, page_tables)
        st = sampling.to_tensors(inp.logits_indices.shape[0])
        # rare shapes (penalty windows, many banned ids) fall back to jit and compile on first use
        step = self.executables.get(_bucket_key(inp, st), self.step_fn)
        self.kv_caches, out = step(self.model.params, self.kv_caches, inp, st)
        return jax.device_get(out)

    def _prepare_input(self, sched: SchedulerOutput, page_tables: list[list[int]]) -> ModelInput:
        num_tokens = self.buckets.num_tokens(sched.num_tokens)
        num_seqs = self.buckets.num_seqs(len(sched.scheduled))
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slots = np.zeros(num_tokens, np.int32)  # padding writes into the null page
        table = np.zeros((num_seqs, self.max_pages_per_seq), np.int32)
        kv_lens = np.zeros(num_seqs, np.int32)
        cu = np.zeros(num_seqs + 1, np.int32)
        at = 0
        for i, (s, pages) in enumerate(zip(sched.scheduled, page_tables)):
            start, n = s.num_computed_tokens, s.num_new_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            page_arr = np.asarray(pages, np.int32)
            token_ids[at:at + n] = s.request.token_ids(start, start + n)
            positions[at:at + n] = pos
            slots[at:at + n] = page_arr[pos // self.page_size] * self.page_size + pos % self.page_size
            table[i, :len(pages)] = page_arr
            kv_lens[i] = start + n
            at += n
            cu[i + 1] = at
        cu[len(sched.scheduled) + 1:] = at
        logits_indices = np.maximum(cu[1:] - 1, 0)
        md = AttentionMetadata(positions=positions, slot_mapping=slots, kv_lens=kv_lens, page_indices=table,
                               cu_q_lens=cu, num_seqs=np.array([len(sched.scheduled)], np.int32))
        return ModelInput(token_ids=token_ids, md=md, logits_indices=logits_indices)

    def _null_batch(self, num_tokens: int, num_seqs: int) -> tuple[ModelInput, SamplingTensors]:
        zeros = np.zeros(num_tokens, np.int32)
        md = AttentionMetadata(positions=zeros, slot_mapping=zeros, kv_lens=np.zeros(num_seqs, np.int32),
                               page_indices=np.zeros((num_seqs, self.max_pages_per_seq), np.int32),
                               cu_q_lens=np.zeros(num_seqs + 1, np.int32), num_seqs=np.zeros(1, np.int32))
        inp = ModelInput(token_ids=zeros, md=md, logits_indices=np.zeros(num_seqs, np.int32))
        return inp, HostSampling([]).to_tensors(num_seqs)

