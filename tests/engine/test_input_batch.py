"""Persistent input batch: slots, token rows, page-table diffs and the flat step layout with pending tokens."""

import numpy as np

from jaxpaged.input_batch import ArrivedTokens, InputBatch
from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler


def setup(num_slots=4, page_size=4):
    pm = PageManager(32, page_size)
    return pm, Scheduler(pm, num_slots, 64, max_model_len=64), InputBatch(num_slots, 64, page_size)


def admit(batch, sched):
    for req in sched.requests:
        if req.request_id not in batch.slot_of:
            batch.add(req)


def updates(batch, out, pm):
    """page_updates as lists."""
    return tuple(u.tolist() for u in batch.page_updates(out, batch.slots(out.requests), pm.pages_of))


def arrived(reqs, id_lists):
    """ArrivedTokens of requests that kept `id_lists` (row i of the step's ids holds list i, padded)."""
    ids = np.full((len(reqs), max(map(len, id_lists))), -7, np.int32)
    for i, row in enumerate(id_lists):
        ids[i, :len(row)] = row
    return ArrivedTokens(reqs, np.arange(len(reqs), dtype=np.int32), np.array([len(r) for r in id_lists], np.int32),
                         ids)


def test_prefill_then_decode_reads_pending_token_from_its_slot():
    pm, sch, batch = setup()
    a = Request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4))
    b = Request("b", [1, 2], SamplingParams(max_tokens=4))
    sch.add_request(a)
    sch.add_request(b)
    out = sch.schedule()
    admit(batch, out)
    lay = batch.layout(out, batch.slots(out.requests), 16, 8)
    assert lay.token_ids.tolist() == [5, 6, 7, 8, 9, 1, 2] + [0] * 9
    assert lay.cu_q_lens.tolist() == [0, 5, 7, 7, 7, 7, 7, 7, 7] and lay.kv_lens.tolist()[:3] == [5, 2, 0]
    assert lay.slots.tolist() == [0, 1] + [4] * 6 and lay.num_seqs == 2
    assert lay.sample_slots.tolist() == [0, 1] + [4] * 6 and lay.positions.tolist()[:2] == [0, 0]
    # the next step is scheduled before step 1's tokens arrive: both decode a pending token
    out2 = sch.schedule()
    lay2 = batch.layout(out2, batch.slots(out2.requests), 16, 8)
    assert lay2.token_ids.tolist()[:2] == [-1, -2]
    assert lay2.kv_lens.tolist()[:2] == [6, 3] and lay2.positions.tolist()[:2] == [1, 1]
    a.append_outputs([42])
    batch.append_tokens(arrived([a], [[42]]))
    assert batch.tokens[0, :6].tolist() == [5, 6, 7, 8, 9, 42] and a.num_pending == 1


def test_append_tokens_takes_several_per_request_and_skips_requests_without_a_slot():
    pm, sch, batch = setup()
    a = Request("a", [5, 6, 7], SamplingParams(max_tokens=8))
    b = Request("b", [1, 2], SamplingParams(max_tokens=8))
    gone = Request("gone", [3], SamplingParams(max_tokens=8))
    for r in (a, b):
        sch.add_request(r)
    admit(batch, sch.schedule())
    batch.append_tokens(arrived([a, gone, b], [[40, 41, 42], [99, 98], [50]]))
    batch.append_tokens(arrived([b, a], [[51, 52], []]))
    assert batch.tokens[0, :6].tolist() == [5, 6, 7, 40, 41, 42] and batch.tokens[1, :5].tolist() == [1, 2, 50, 51, 52]
    assert batch.num_known.tolist()[:2] == [6, 5] and 99 not in batch.tokens and -7 not in batch.tokens


def test_page_updates_send_only_new_pages_and_a_new_slot_owner_starts_over():
    pm, sch, batch = setup(page_size=4)
    a = Request("a", list(range(7)), SamplingParams(max_tokens=8))
    sch.add_request(a)
    out = sch.schedule()
    admit(batch, out)
    rows, cols, vals = updates(batch, out, pm)
    assert (rows, cols, vals) == ([0, 0], [0, 1], pm.pages_of("a"))
    a.append_outputs([3])
    out = sch.schedule()  # position 7 still fits in page 2
    assert updates(batch, out, pm) == ([], [], [])
    a.append_outputs([3])
    out = sch.schedule()  # position 8 opens a third page
    assert updates(batch, out, pm) == ([0], [2], [pm.pages_of("a")[2]])
    batch.remove("a")
    b = Request("b", [9] * 3, SamplingParams())
    assert batch.add(b) == 0 and batch.pages_sent[0] == 0
    assert np.all(batch.tokens[0, :3] == 9) and batch.num_known[0] == 3


def test_table_update_chunks_land_in_order_and_the_step_program_gets_the_last():
    import types

    import jax

    from jaxpaged import runner
    from jaxpaged.step_programs import update_tables

    chunk = runner._UPDATE_CHUNK
    num_slots, width = 8, 2 * chunk
    n = 2 * chunk + 5  # two chunks through the update program, then 5 entries for the step program
    rows = [i % num_slots for i in range(n)]
    cols = [i // num_slots for i in range(n)]
    vals = [1000 + i for i in range(n)]
    calls = []
    update = jax.jit(update_tables)
    stub = types.SimpleNamespace(batch=types.SimpleNamespace(pad_slot=num_slots),
                                 page_tables=np.zeros((num_slots + 1, width), np.int32),
                                 _program=lambda key: calls.append(key) or update)
    last = runner.ModelRunner._table_updates(stub, (rows, cols, vals))
    assert calls == [("update",)] * 2 and last.shape == (3, chunk)
    assert (last[:, :5] == [rows[-5:], cols[-5:], vals[-5:]]).all() and (last[0, 5:] == num_slots).all()
    tables = np.asarray(update_tables(stub.page_tables, last))
    want = np.zeros((num_slots + 1, width), np.int32)
    want[rows, cols] = vals
    assert (tables[:num_slots] == want[:num_slots]).all()
    empty = runner.ModelRunner._table_updates(stub, ([], [], []))
    assert len(calls) == 2 and (empty[0] == num_slots).all()


def test_page_updates_send_a_fork_its_shared_pages_and_a_copy_on_write_replaces_an_entry_the_device_had():
    pm, sch, batch = setup(page_size=4)
    params = SamplingParams(max_tokens=4, n=2)
    a, b = Request("a", list(range(6)), params), Request("b", list(range(6)), params)
    a.forks = [b]
    sch.add_request(a)
    out = sch.schedule()  # a computes the prompt and samples; b forks from it, sharing both pages
    admit(batch, out)
    batch.add(b)  # as the runner adds a step's forked children
    shared = list(pm.pages_of("a"))
    assert pm.pages_of("b") == shared and len(shared) == 2
    assert updates(batch, out, pm) == ([0, 0, 1, 1], [0, 1, 0, 1], shared + shared)
    a.append_outputs([7])
    b.append_outputs([7])
    out = sch.schedule()  # both write position 6 into the shared second page: the first writer gets a copy
    (copy,) = out.copies
    assert (copy.request_id, copy.index, copy.src) == ("a", 1, shared[1])
    assert pm.pages_of("a") == [shared[0], copy.dst] and pm.pages_of("b") == shared
    assert updates(batch, out, pm) == ([0], [1], [copy.dst])
