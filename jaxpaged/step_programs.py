"""The pure functions the runner compiles: the forward pass, the sampler, the multi-step decode, page-table updates,
copy-on-write page copies.

Token ids of a step may be negative: -(slot + 1) stands for the token the previous step sampled into
`slot_tokens[slot]`, which has not reached the host yet (async scheduling); the programs substitute it on the
device.
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp

from jaxpaged.kernels.reference import PAD_SLOT, token_layout
from jaxpaged.models import AttentionMetadata, LoadedModel
from jaxpaged.sampler import SamplerFlags, SamplerOutput, sample, token_logprobs
from jaxpaged.sampling_batch import unpack_tensors

BANNED_MIN = 8  # width of the banned-token array when no row bans anything
PROMPT_CHUNK = 256  # rows of [rows, vocab] float32 logits computed at a time for prompt logprobs
# XLA options the step programs compile with on a GPU: XLA's own Triton GEMM emitter off, so every matmul is a
# cuBLAS(Lt) call beside separate elementwise fusions. On an H100 (2026-12-08, RESULTS.md) that made the 1B's
# 256 x 512 / 128 run 1.04x faster (prefill and decode steps alike) and the ragged one 1.04x; XLA's autotuner,
# left to choose between its Triton GEMMs and cuBLAS per matmul, chose slower programs.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compiler_options(backend: str, xla_flags: str | None = None) -> dict | None:
    """The options `Lowered.compile` gets for a step program on `backend`: GPU_COMPILER_OPTIONS on a GPU, less any
    option `xla_flags` (default: $XLA_FLAGS) sets itself (the user's choice stands); None elsewhere."""
    if backend not in ("gpu", "cuda", "rocm"):
        return None
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    return {k: v for k, v in GPU_COMPILER_OPTIONS.items() if not re.search(rf"--{k}(=|\s|$)", flags)} or None


def _substitute_pending(token_ids, slot_tokens):
    return jnp.where(token_ids < 0, slot_tokens[jnp.maximum(-token_ids - 1, 0)], token_ids)


def _metadata(page_indices, seq_ids, positions, live, kv_lens, cu_q_lens, num_seqs, page_size: int,
              decode_only: bool = False) -> AttentionMetadata:
    """The step's AttentionMetadata: each live token's K/V slot from its sequence's pages (others: PAD_SLOT)."""
    page = page_indices[seq_ids, positions // page_size]
    slot_mapping = jnp.where(live, page * page_size + positions % page_size, PAD_SLOT)
    return AttentionMetadata(positions=positions, slot_mapping=slot_mapping, kv_lens=kv_lens,
                             page_indices=page_indices, cu_q_lens=cu_q_lens, num_seqs=num_seqs,
                             decode_only=decode_only)


def forward_step(model: LoadedModel, attn_impl: str, page_size: int, params, kv_caches, page_tables, slot_tokens,
                 token_ids, seq_ints, table_updates):
    """Forward pass of a padded ragged batch; returns the updated pool and each sequence's last hidden state.

    token_ids [T] int32; seq_ints [4S + 2]: cu_q_lens [S + 1], kv_lens [S], slots [S], last_rows [S] (the token
    whose hidden state each sampler row reads: a sequence's last token, or for a forked child its parent's),
    num_seqs [1]; table_updates [3, U]: page-table entries applied first (`update_tables`). Returns the pool and
    the page tables (arguments 1 and 2, donated), the sampler rows' hidden states [S, hidden] and every token's
    [T, hidden] (read only by `prompt_logprobs_step`).
    """
    page_tables = update_tables(page_tables, table_updates)
    num_tokens, num_seqs = token_ids.shape[0], (seq_ints.shape[0] - 2) // 4
    cu_q_lens, kv_lens = seq_ints[:num_seqs + 1], seq_ints[num_seqs + 1:2 * num_seqs + 1]
    slots, last_rows = seq_ints[2 * num_seqs + 1:3 * num_seqs + 1], seq_ints[3 * num_seqs + 1:4 * num_seqs + 1]
    n = seq_ints[4 * num_seqs + 1:]
    token_ids = _substitute_pending(token_ids, slot_tokens)
    seq_ids, positions, live = token_layout(kv_lens, cu_q_lens, n, num_tokens)
    positions = jnp.where(live, positions, 0)
    md = _metadata(page_tables[slots], seq_ids, positions, live, kv_lens, cu_q_lens, n, page_size)
    hidden, kv_caches = model.forward(params, token_ids, md, kv_caches, attn_impl=attn_impl)
    return kv_caches, page_tables, hidden[last_rows], hidden  # [S, hidden], [T, hidden]


def sample_step(model: LoadedModel, flags: SamplerFlags, params, slot_tokens, hidden, floats, ints, penalty_tokens,
                banned_tokens):
    """Logits of each sequence's last token -> sampled ids, also stored in `slot_tokens` (argument 0, donated).

    floats [6, S], ints [5, S] (`SamplingBatch.gather`'s arrays, then the slot to store each id in)."""
    logits = model.compute_logits(params, hidden)  # [S, V] f32
    out = sample(logits, unpack_tensors(floats, ints[:4], penalty_tokens, banned_tokens), flags)
    return slot_tokens.at[ints[4]].set(out.token_ids), out


def decode_steps(model: LoadedModel, attn_impl: str, page_size: int, flags: SamplerFlags, num_steps: int, params,
                 kv_caches, page_tables, slot_tokens, token_ids, seq_ints, floats, ints, table_updates):
    """Up to `num_steps` decode steps of S one-token sequences in one program (a `lax.scan`), each step's sampled
    ids fed to the next on the device.

    token_ids [S] int32: each sequence's input token; seq_ints [4S + 2]: cu_q_lens [S + 1], kv_lens [S] (after
    the first step's K/V), slots [S], steps [S] (sub-steps this sequence runs: a sequence stops writing K/V
    after its own count, and its later samples are dropped by the host), num_seqs [1]. floats / ints as in
    `sample_step`, positions for the first sub-step; table_updates as in `forward_step`. Rows use neither
    penalties nor banned ids (the scheduler runs those in single steps). Returns the pool, the page tables,
    `slot_tokens` with each sequence's last sampled id, and the sampler outputs stacked [num_steps, S, ...]. Pool,
    page tables and slot_tokens (arguments 1 to 3) are donated.
    """
    page_tables = update_tables(page_tables, table_updates)
    num_seqs = token_ids.shape[0]
    cu_q_lens, kv_lens0 = seq_ints[:num_seqs + 1], seq_ints[num_seqs + 1:2 * num_seqs + 1]
    slots, steps = seq_ints[2 * num_seqs + 1:3 * num_seqs + 1], seq_ints[3 * num_seqs + 1:4 * num_seqs + 1]
    n = seq_ints[4 * num_seqs + 1:]
    page_indices = page_tables[slots]  # [S, max_pages]
    rows = jnp.arange(num_seqs)
    tensors = unpack_tensors(floats, ints[:4], jnp.full((num_seqs, 1), -1, jnp.int32),
                             jnp.full((num_seqs, BANNED_MIN), -1, jnp.int32))

    def step(carry, j):
        tokens, kv = carry
        live = j < steps  # [S]
        kv_lens = kv_lens0 + jnp.minimum(j, jnp.maximum(steps - 1, 0))  # frozen once a row is done
        positions = jnp.maximum(kv_lens - 1, 0)
        md = _metadata(page_indices, rows, positions, live, kv_lens, cu_q_lens, n, page_size, decode_only=True)
        hidden, kv = model.forward(params, tokens, md, kv, attn_impl=attn_impl)  # [S, hidden]
        logits = model.compute_logits(params, hidden)
        out = sample(logits, dataclasses.replace(tensors, positions=tensors.positions + j), flags)
        return (out.token_ids, kv), out

    tokens = _substitute_pending(token_ids, slot_tokens)
    (_, kv_caches), outs = jax.lax.scan(step, (tokens, kv_caches), jnp.arange(num_steps, dtype=jnp.int32))
    last = outs.token_ids[jnp.maximum(steps - 1, 0), rows]  # [S]
    return kv_caches, page_tables, slot_tokens.at[ints[4]].set(last), outs


def prompt_logprobs_step(model: LoadedModel, params, hidden, targets) -> SamplerOutput:
    """Logprob and rank of `targets` [T] (the next prompt token of each position) under each token's hidden state
    [T, hidden], and the top tokens, PROMPT_CHUNK rows of logits at a time; `token_ids` holds the targets."""
    num_tokens = hidden.shape[0]
    chunk = min(num_tokens, PROMPT_CHUNK)
    pad = -num_tokens % chunk  # a token bucket that is not a multiple of the chunk (max_num_batched_tokens)
    hidden, targets = jnp.pad(hidden, ((0, pad), (0, 0))), jnp.pad(targets, (0, pad))

    def rows(args):
        h, t = args
        return token_logprobs(model.compute_logits(params, h), t)

    out = jax.lax.map(rows, (hidden.reshape(-1, chunk, hidden.shape[1]), targets.reshape(-1, chunk)))
    return jax.tree.map(lambda x: x.reshape(num_tokens + pad, *x.shape[2:])[:num_tokens], out)


def copy_pages(kv_caches, copies):
    """Copy-on-write of pool pages: page dst = page src in every layer's K and V, for each column of copies [2, C]
    (src, dst; padding has dst out of range and is dropped). The pool (argument 0) is donated."""
    src, dst = copies
    return [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop")) for k, v in kv_caches]


def update_tables(page_tables, updates):
    """page_tables[slot, col] = page for each column of updates [3, U] (donated; padding targets the pad row).
    The forward and decode programs apply a chunk first; this program alone takes the chunks before it."""
    return page_tables.at[updates[0], updates[1]].set(updates[2])


def split_steps(out: SamplerOutput) -> list[SamplerOutput]:
    """Host arrays of a multi-step decode's stacked outputs [K, S, ...] -> one SamplerOutput per sub-step (fields
    that are None stay None). Indexed field by field: a `jax.tree.map` per sub-step cost 5x as much."""
    fields = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [SamplerOutput(*(None if x is None else x[j] for x in fields)) for j in range(out.token_ids.shape[0])]
