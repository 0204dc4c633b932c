"""Test helper: run a LoadedModel (jitted) over a few sequences with a small shuffled page pool."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models import AttentionMetadata, LoadedModel

PAGE_SIZE = 4


def _bucket(n: int) -> int:
    """Pads token counts to powers of two (>= 8) so a test compiles a handful of shapes, as the runner does."""
    return max(8, 1 << (n - 1).bit_length())


def _forward_logits(model: LoadedModel, attn_impl: str, params, token_ids, md, kv):
    hidden, kv = model.forward(params, token_ids, md, kv, attn_impl=attn_impl)
    return model.compute_logits(params, hidden), kv  # [T, vocab] f32


class PagedBatch:
    """Sequences sharing one pool of pages (page 0, the null page, never handed out), pages shuffled.

    `step(chunks)` feeds chunk s (any length >= 1) to sequence s in one ragged batch and returns each sequence's
    logits [len(chunk), vocab] float32.
    """

    def __init__(self, model: LoadedModel, max_lens: list[int], seed: int = 0, attn_impl: str = "reference"):
        cfg = model.config
        self.model = model
        per_seq = [-(-n // PAGE_SIZE) for n in max_lens]
        num_pages = sum(per_seq) + 3  # a couple of pages nobody owns
        perm = np.random.default_rng(seed).permutation(np.arange(1, num_pages))
        self.tables = np.zeros((len(max_lens), max(per_seq)), np.int32)  # [S, max_pages]
        for s, start in enumerate(np.cumsum([0] + per_seq[:-1])):
            self.tables[s, : per_seq[s]] = perm[start:start + per_seq[s]]
        shape = (num_pages, PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
                   for _ in range(cfg.num_hidden_layers)]
        self.lengths = np.zeros(len(max_lens), np.int32)
        self._fn = jax.jit(functools.partial(_forward_logits, model, attn_impl), donate_argnums=(3,))

    def step(self, chunks: list[list[int]]) -> list[np.ndarray]:
        assert len(chunks) == len(self.lengths) and all(chunks)
        q_lens = np.array([len(c) for c in chunks], np.int32)
        n, t = int(q_lens.sum()), _bucket(int(q_lens.sum()))
        seq = np.repeat(np.arange(len(chunks)), q_lens)
        pos = np.concatenate([np.arange(l, l + q) for l, q in zip(self.lengths, q_lens)]).astype(np.int32)
        slots = self.tables[seq, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        pad = t - n  # padding tokens: position 0, written into the null page (PAD_SLOT would drop them)
        md = AttentionMetadata(
            positions=jnp.asarray(np.pad(pos, (0, pad))), slot_mapping=jnp.asarray(np.pad(slots, (0, pad))),
            kv_lens=jnp.asarray(self.lengths + q_lens), page_indices=jnp.asarray(self.tables),
            cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)),
            num_seqs=jnp.asarray([len(chunks)], jnp.int32))
        token_ids = jnp.asarray(np.pad(np.concatenate(chunks), (0, pad)).astype(np.int32))
        logits, self.kv = self._fn(self.model.params, token_ids, md, self.kv)
        self.lengths = self.lengths + q_lens
        return np.split(np.asarray(logits)[:n], np.cumsum(q_lens)[:-1])


class PagedSequence(PagedBatch):
    """One sequence, fed in chunks of any size."""

    def __init__(self, model: LoadedModel, max_len: int, seed: int = 0, attn_impl: str = "reference"):
        super().__init__(model, [max_len], seed, attn_impl)

    def feed(self, token_ids: list[int]) -> np.ndarray:
        """Runs the chunk; returns logits [len(chunk), vocab] float32."""
        return self.step([list(token_ids)])[0]


def greedy(model: LoadedModel, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy continuation of all prompts in one batch: one ragged prefill, then one-token decode steps."""
    batch = PagedBatch(model, [len(p) + num_tokens for p in prompts])
    out = [[int(lg[-1].argmax())] for lg in batch.step([list(p) for p in prompts])]
    for _ in range(num_tokens - 1):
        for o, lg in zip(out, batch.step([[o[-1]] for o in out])):
            o.append(int(lg[-1].argmax()))
    return out
