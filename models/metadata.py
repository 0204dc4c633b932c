"""AttentionMetadata: the flat ragged batch layout shared by the runner, the model and the kernels."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each new token sits and which pages each sequence reads (see `ragged_paged_attention`)."""

    positions: jax.Array     # [T] int32  absolute position of each new token (padding: 0)
    slot_mapping: jax.Array  # [T] int32  page * page_size + offset to write its K/V (padding: PAD_SLOT)
    kv_lens: jax.Array       # [S] int32
    page_indices: jax.Array  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array     # [S + 1] int32
    num_seqs: jax.Array      # [1] int32
    # static: every sequence has exactly one new token (T == S), so kernels may skip their prefill work
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
