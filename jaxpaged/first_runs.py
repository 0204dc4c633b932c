"""Each compiled step program run once before the first request, on inputs that change nothing a request reads.

On a GPU, XLA records a program's command buffers (CUDA graphs) and loads its kernels when the program first runs:
tens of milliseconds of host time. Paid inside a run it leaves the device idle: on an H100 the first 8-token decode
of a run took 43 ms of host time instead of ~1.5 ms (RESULTS.md). vLLM captures its CUDA graphs at start-up for the
same reason. Programs compiled in the background afterwards run once while the server is idle
(`ModelRunner.idle_first_run`). Elsewhere (CPU, TPU) XLA records no command buffers and nothing runs here.

The inputs are one sequence of one token in the padding slot: its K/V go to position 0 of the null page (whose
contents no request reads: padding points there and real rows are masked by their lengths), its sampled id to the
padding slot's entry of `slot_tokens`, its page-table entry to the padding row (the null page again), and a copy's
destination is out of range (dropped). Each input is of the kind a step passes (a NumPy array, or a device array
where a step passes another program's output): a call with other kinds would leave the step's first call of the
program to jax's slow dispatch path (0.5-0.8 ms of host time on a CPU for a small model).
"""

import numpy as np

RUN_ONCE_PLATFORMS = ("gpu", "cuda", "rocm")


def idle_seq_ints(num_seqs: int, pad_slot: int, decode: bool) -> np.ndarray:
    """[4S + 2] int32 step metadata of one one-token sequence in the padding slot, padded to `num_seqs` rows:
    cu_q_lens [0, 1, 1, ...], kv_lens [1, 0, ...], slots (all the padding slot), then the fourth column (a
    forward's last rows: zeros; a decode's sub-steps: [1, 0, ...]) and num_seqs = 1."""
    cu = np.ones(num_seqs + 1, np.int32)
    cu[0] = 0
    first = np.zeros(num_seqs, np.int32)
    first[0] = 1
    fourth = first if decode else np.zeros(num_seqs, np.int32)
    return np.concatenate([cu, first, np.full(num_seqs, pad_slot, np.int32), fourth, np.ones(1, np.int32)])


def run_once(runner, key: tuple, program) -> None:
    """Runs compiled program `key` of `runner` (a `ModelRunner`) once on idle inputs, keeping the state it
    returns (the pool, page tables and `slot_tokens` are donated to it)."""
    kind, *shape = key
    params, pad = runner.model.params, runner.batch.pad_slot
    if kind == "forward":
        num_tokens, num_seqs = shape
        runner.kv_caches, runner.page_tables, _, _ = program(
            params, runner.kv_caches, runner.page_tables, runner.slot_tokens, np.zeros(num_tokens, np.int32),
            idle_seq_ints(num_seqs, pad, decode=False), runner.no_table_updates())
    elif kind == "sample":
        num_seqs, _, penalty_width, banned_width = shape
        hidden = runner.zeros_as_output((num_seqs, runner.model.config.hidden_size), runner.model.dtype)
        floats, ints = _idle_sampling(runner, num_seqs)
        runner.slot_tokens, _ = program(params, runner.slot_tokens, hidden, floats, ints,
                                        np.full((num_seqs, penalty_width), -1, np.int32),
                                        np.full((num_seqs, banned_width), -1, np.int32))
    elif kind == "decode":
        num_seqs = shape[0]
        floats, ints = _idle_sampling(runner, num_seqs)
        runner.kv_caches, runner.page_tables, runner.slot_tokens, _ = program(
            params, runner.kv_caches, runner.page_tables, runner.slot_tokens, np.zeros(num_seqs, np.int32),
            idle_seq_ints(num_seqs, pad, decode=True), floats, ints, runner.no_table_updates())
    elif kind == "update":
        runner.page_tables = program(runner.page_tables, runner.no_table_updates())
    elif kind == "copy":
        runner.kv_caches = program(runner.kv_caches, runner.copy_chunk([]))
    elif kind == "prompt":
        num_tokens = shape[0]
        hidden = runner.zeros_as_output((num_tokens, runner.model.config.hidden_size), runner.model.dtype)
        program(params, hidden, np.zeros(num_tokens, np.int32))
    else:
        raise ValueError(f"no idle inputs for step program {key}")


def _idle_sampling(runner, num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's floats [6, S] and ints [5, S] of `num_seqs` rows of the padding slot (greedy), each storing
    its id in the padding slot."""
    slots = np.full(num_seqs, runner.batch.pad_slot, np.int32)
    floats, ints = runner.sampling.gather(slots, np.zeros(num_seqs, np.int32))
    return floats, np.concatenate([ints, slots[None]])
