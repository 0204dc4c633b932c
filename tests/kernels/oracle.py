"""A per-sequence numpy oracle for ragged paged attention and a random ragged batch builder."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class RaggedBatch:
    """A random ragged batch with its pages filled: inputs of `ragged_paged_attention`."""

    q: np.ndarray             # [T, H, D]
    k_pages: np.ndarray       # [num_pages, page_size, KVH, D]
    v_pages: np.ndarray
    kv_lens: np.ndarray       # [S]
    page_indices: np.ndarray  # [S, max_pages]
    cu_q_lens: np.ndarray     # [S + 1]
    num_seqs: np.ndarray      # [1]

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_indices, self.cu_q_lens, self.num_seqs)


def make_batch(rng: np.random.Generator, q_lens, kv_lens, *, num_heads, num_kv_heads, head_dim, page_size,
               max_pages, pad_seqs=0, pad_tokens=0, dtype=np.float32) -> RaggedBatch:
    """Builds a batch of len(q_lens) live sequences plus `pad_seqs` padding ones, pages shuffled, page 0 unused."""
    live = len(q_lens)
    num_seqs_total = live + pad_seqs
    pages_needed = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + sum(pages_needed) + 2
    perm = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((num_seqs_total, max_pages), np.int32)
    at = 0
    for s, n in enumerate(pages_needed):
        table[s, :n] = perm[at:at + n]
        at += n
    cu = np.zeros(num_seqs_total + 1, np.int32)
    cu[1:live + 1] = np.cumsum(q_lens)
    cu[live + 1:] = cu[live]
    total = int(cu[live]) + pad_tokens
    return RaggedBatch(
        q=rng.standard_normal((total, num_heads, head_dim)).astype(dtype),
        k_pages=rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(dtype),
        v_pages=rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(dtype),
        kv_lens=np.array(list(kv_lens) + [0] * pad_seqs, np.int32),
        page_indices=table,
        cu_q_lens=cu,
        num_seqs=np.array([live], np.int32),
    )


def attention_oracle(b: RaggedBatch, sm_scale: float) -> np.ndarray:
    """Dense float64 attention per sequence; rows of padding tokens are left at zero."""
    q = b.q.astype(np.float64)
    out = np.zeros_like(q)
    page_size = b.k_pages.shape[1]
    group = q.shape[1] // b.k_pages.shape[2]
    for s in range(int(b.num_seqs[0])):
        lo, hi, n = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1]), int(b.kv_lens[s])
        pages = b.page_indices[s, : -(-n // page_size)]
        k = b.k_pages[pages].reshape(-1, *b.k_pages.shape[2:])[:n].astype(np.float64)
        v = b.v_pages[pages].reshape(-1, *b.v_pages.shape[2:])[:n].astype(np.float64)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [n, H, D]
        for i in range(hi - lo):
            pos = n - (hi - lo) + i
            scores = np.einsum("hd,lhd->hl", q[lo + i], k[: pos + 1]) * sm_scale
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[lo + i] = np.einsum("hl,lhd->hd", p, v[: pos + 1])
    return out
