"""Test helper: run a LoadedModel over one sequence with a small shuffled page pool."""

import jax.numpy as jnp
import numpy as np

from jaxpaged.models import AttentionMetadata, LoadedModel

PAGE_SIZE = 4


class PagedSequence:
    """One sequence's pages in a pool of `num_pages` (page 0 unused), fed in chunks of any size."""

    def __init__(self, model: LoadedModel, max_len: int, seed: int = 0):
        cfg = model.config
        self.model = model
        num_pages = -(-max_len // PAGE_SIZE) + 3
        self.pages = np.random.default_rng(seed).permutation(np.arange(1, num_pages))[: -(-max_len // PAGE_SIZE)]
        shape = (num_pages, PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
                   for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def feed(self, token_ids: list[int]) -> np.ndarray:
        """Runs the chunk; returns logits [len(chunk), vocab] float32."""
        n = len(token_ids)
        pos = np.arange(self.length, self.length + n, dtype=np.int32)
        slots = (self.pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).astype(np.int32)
        md = AttentionMetadata(positions=pos, slot_mapping=slots, kv_lens=np.array([self.length + n], np.int32),
                               page_indices=self.pages[None].astype(np.int32),
                               cu_q_lens=np.array([0, n], np.int32), num_seqs=np.array([1], np.int32))
        hidden, self.kv = self.model.forward(self.model.params, np.asarray(token_ids, np.int32), md, self.kv,
                                             attn_impl="reference")
        self.length += n
        return np.asarray(self.model.compute_logits(self.model.params, hidden))
