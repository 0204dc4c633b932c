"""Static-shape scheduling of a ragged batch into query blocks, computed from runtime arrays (no recompiles)."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class QueryBlocks:
    """Block i covers tokens [start[i], start[i] + count[i]) of sequence seq[i]; count 0 marks an idle block."""

    seq: jax.Array    # [NB] int32
    start: jax.Array  # [NB] int32
    count: jax.Array  # [NB] int32


def num_query_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Upper bound on blocks: each sequence adds at most one partial block."""
    return -(-num_tokens // block_q) + num_seqs


def query_blocks(cu_q_lens: jax.Array, num_seqs: jax.Array, block_q: int, num_blocks: int) -> QueryBlocks:
    """Splits each live sequence's new tokens into blocks of `block_q` (cu_q_lens [S + 1], num_seqs [1])."""
    s = cu_q_lens.shape[0] - 1
    q_lens = jnp.where(jnp.arange(s) < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)
    per_seq = (q_lens + block_q - 1) // block_q  # [S]
    ends = jnp.cumsum(per_seq)  # [S] inclusive
    i = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right"), s - 1).astype(jnp.int32)
    j = i - (ends[seq] - per_seq[seq])
    count = jnp.where(i < ends[-1], jnp.minimum(block_q, q_lens[seq] - j * block_q), 0)
    return QueryBlocks(seq, (cu_q_lens[seq] + j * block_q).astype(jnp.int32), count.astype(jnp.int32))
