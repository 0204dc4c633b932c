"""The benchmark scripts' pure parts: workloads, serving metrics, the SSE parser, trace busy time, the roofline.
Nothing here loads a model or times anything."""

import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import command_buffers  # noqa: E402  (benchmarks/ import their siblings by name, as scripts)
import host_loop  # noqa: E402
import roofline  # noqa: E402
import serving  # noqa: E402
import step_profile  # noqa: E402
import throughput  # noqa: E402
import trace_busy  # noqa: E402
import workloads  # noqa: E402
from sse_http import SSEParser  # noqa: E402

from jaxpaged.models import ModelConfig  # noqa: E402


def test_range_bounds_are_vllms_floor_and_ceil_raised_to_the_minimum():
    assert workloads.range_bounds(100, 0.5) == (50, 150)
    assert workloads.range_bounds(3, 0.9, minimum=1) == (1, 6)
    assert workloads.range_bounds(7, 0.0) == (7, 7)
    with pytest.raises(ValueError, match="range_ratio"):
        workloads.range_bounds(10, 1.0)


def test_random_requests_lengths_stay_in_bounds_and_repeat_by_seed():
    reqs = workloads.random_requests(2000, 100, 10, 0.5, vocab_size=32000, seed=3)
    ins = [len(r.prompt_token_ids) for r in reqs]
    outs = [r.output_len for r in reqs]
    assert (min(ins), max(ins)) == (50, 150) and (min(outs), max(outs)) == (5, 15)
    assert all(100 <= t < 30000 for r in reqs[:50] for t in r.prompt_token_ids)
    assert workloads.random_requests(2000, 100, 10, 0.5, 32000, seed=3) == reqs
    assert workloads.random_requests(2000, 100, 10, 0.5, 32000, seed=4) != reqs


def test_random_requests_without_range_are_the_earlier_fixed_length_prompts():
    reqs = workloads.random_requests(6, 16, 4, 0.0, vocab_size=128256, seed=0)
    earlier = np.random.default_rng(0).integers(100, 30000, size=(6, 16)).tolist()
    assert [r.prompt_token_ids for r in reqs] == earlier
    assert [r.output_len for r in reqs] == [4] * 6


def test_nano_vllm_workload_is_512_requests_of_100_to_1024_tokens():
    reqs = workloads.nano_vllm_requests()
    ins = [len(r.prompt_token_ids) for r in reqs]
    outs = [r.output_len for r in reqs]
    assert len(reqs) == 512
    assert 100 <= min(ins) and max(ins) <= 1024 and 100 <= min(outs) and max(outs) <= 1024
    assert all(0 <= t <= 10000 for r in reqs for t in r.prompt_token_ids)
    assert workloads.nano_vllm_requests() == reqs


def test_nano_vllm_workload_draws_as_nano_vllm_bench_does():
    rng = random.Random(0)  # bench.py: seed(0); prompts first, then max_tokens
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(4)]
    outs = [rng.randint(100, 1024) for _ in range(4)]
    reqs = workloads.nano_vllm_requests(4)
    assert [r.prompt_token_ids for r in reqs] == prompts and [r.output_len for r in reqs] == outs


def _results():
    return [serving.RequestResult(prompt_len=10, start=0.0, chunk_times=[0.1, 0.15, 0.25, 0.3], output_tokens=4),
            serving.RequestResult(prompt_len=20, start=1.0, chunk_times=[1.2], output_tokens=1),
            serving.RequestResult(prompt_len=30, start=1.0, error="ConnectionResetError")]


def test_request_timing_of_synthetic_chunks():
    ttft, itl, e2el, tpot = serving.request_timing(_results()[0])
    assert ttft == pytest.approx(0.1) and e2el == pytest.approx(0.3)
    assert itl == pytest.approx([0.05, 0.1, 0.05])
    assert tpot == pytest.approx(0.2 / 3)
    assert serving.request_timing(_results()[1])[3] is None  # one output token: no TPOT


def test_compute_metrics_counts_successes_and_takes_vllm_percentiles():
    m = serving.compute_metrics(_results(), duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 5)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.5 and m["total_token_throughput"] == 17.5
    assert (m["mean_ttft_ms"], m["median_ttft_ms"], m["p99_ttft_ms"]) == pytest.approx((150, 150, 199))
    assert (m["mean_itl_ms"], m["median_itl_ms"], m["p99_itl_ms"]) == pytest.approx((200 / 3, 50, 99))
    assert (m["mean_tpot_ms"], m["p99_tpot_ms"]) == pytest.approx((200 / 3, 200 / 3))
    assert (m["mean_e2el_ms"], m["median_e2el_ms"]) == pytest.approx((250, 250))


def test_gauge_value_reads_the_running_count_from_prometheus_text():
    text = ("# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running_x{model_name="m"} 9.0\n'
            'vllm:num_requests_running{model_name="m"} 37.0\n')
    assert serving.gauge_value(text, serving.RUNNING_METRIC) == 37.0
    assert serving.gauge_value("vllm:num_requests_waiting 2.0\n", serving.RUNNING_METRIC) is None


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_rate_fraction_outside_0_1_is_refused(fraction, capsys):
    with pytest.raises(SystemExit):
        serving.parse_args(["--rate-fraction", fraction])
    assert "--rate-fraction must be in (0, 1]" in capsys.readouterr().err


STREAM = 'data: {"t": "é"}\r\n\r\n: ping\n\nevent: x\ndata: a\ndata: b\n\ndata: [DONE]\n\n'.encode()


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(STREAM)])
def test_sse_parser_splits_events_whatever_the_byte_boundaries(step):
    parser = SSEParser()
    events = [e for i in range(0, len(STREAM), step) for e in parser.feed(STREAM[i:i + step])]
    assert events == ['{"t": "é"}', "a\nb", "[DONE]"]


def test_sse_parser_holds_an_unfinished_event():
    parser = SSEParser()
    assert parser.feed(b"data: 1\n") == []
    assert parser.feed(b"\ndata: 2") == ["1"]
    assert parser.feed(b"\n\n") == ["2"]


def test_command_buffer_log_counts_launches_and_updates_per_marked_step():
    log = ["CmdBufThunk dev=0 updated=6 stabilized=0 force=0 needs_update=1",  # a warm-up launch, before any step
           "Execute command buffer; num_executions=1",
           step_profile.STEP_MARKER,
           "CmdBufThunk dev=0 updated=3 stabilized=0 force=1 needs_update=1",
           "Updated command buffer in 120 \u03bcs; num_commands=40",
           "Execute command buffer; num_executions=1",
           "Execute command buffer thunk as a regular thunk sequence because we detected active profiling session",
           "CmdBufThunk dev=0 updated=0 stabilized=0 force=0 needs_update=0",
           "Execute command buffer; num_executions=2",
           step_profile.STEP_MARKER,
           "Update command buffer on device #0 by recoding command buffer cmd sequence; updated_allocs=5",
           "Updated command buffer in 80 \u03bcs; num_commands=7",
           "Execute command buffer on device #0; num_executions=1"]
    got = command_buffers.summarize(log)
    assert (got["launches"], got["updates"], got["update_us"], got["forced"]) == (4, 2, 200, 1)
    assert got["moved_per_launch"] == {0: 1, 3: 1, 5: 1, 6: 1}
    assert got["steps"] == 2 and got["per_step"] == {"launches": 1.5, "updates": 1.0, "update_us": 100.0,
                                                     "forced": 0.5}


def test_union_length_counts_overlaps_once_and_clips():
    assert trace_busy.union_length([(20, 25), (0, 10), (5, 15)]) == 20
    assert trace_busy.union_length([(0, 10), (5, 15), (20, 25)], lo=7, hi=22) == 10


def _meta(pid, name, tid=None):
    kind = "process_name" if tid is None else "thread_name"
    return {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}, **({} if tid is None else {"tid": tid})}


def _span(pid, tid, ts, end, name="k"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": end - ts, "name": name}


def test_busy_summary_unions_gpu_stream_kernels_over_the_step_window():
    events = [_meta(1, "/device:GPU:0"), _meta(1, "Stream #13(Compute)", 10), _meta(1, "XLA Ops", 11),
              _meta(2, "/host:CPU"), _meta(2, "python", 20),
              _span(2, 20, 0, 100, "jaxpaged_step"), _span(2, 20, 120, 200, "jaxpaged_step"),
              _span(1, 10, 10, 40), _span(1, 10, 30, 60), _span(1, 10, 150, 170), _span(1, 10, 190, 250),
              _span(1, 10, 80, 90, "MemcpyH2D"), _span(1, 11, 0, 200, "fusion")]
    s = trace_busy.busy_summary(events)
    assert (s["device"], s["window_us"], s["busy_us"], s["kernels"]) == ("gpu", 200, 80, 4)
    assert s["busy_fraction"] == 0.4 and s["kernel_threads"] == ["Stream #13(Compute)"]
    assert s["top_kernels_us"] == {"k": 140}  # kernels starting in the window, whole durations


def test_busy_summary_of_a_cpu_trace_has_no_device_and_estimates_xla_work():
    events = [_meta(2, "/host:CPU"), _meta(2, "python", 20), _meta(2, "tf_XLAEigen/1", 21),
              _span(2, 20, 0, 200, "jaxpaged_step"), _span(2, 21, 0, 50, "fusion"), _span(2, 21, 40, 80, "dot"),
              _span(2, 21, 0, 200, "ThreadpoolListener::StartRegion")]
    s = trace_busy.busy_summary(events)
    assert (s["device"], s["busy_us"], s["busy_fraction"]) == (None, None, None)
    assert (s["cpu_xla_busy_us"], s["cpu_xla_busy_fraction"]) == (80, 0.4)


TINY = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=2)
# A: 3 prompt tokens, 3 outputs (2 decode steps); B: 2 prompt tokens, 2 outputs (1 decode step)
TWO = [workloads.BenchRequest([1, 2, 3], 3), workloads.BenchRequest([1, 2], 2)]


def test_model_counts_of_a_tiny_config():
    c = roofline.ModelCounts.from_config(TINY, dtype_bytes=2)
    # per layer: q, o 4x4 each; k, v 4x2 each; mlp 3 x 4x8; 2 norms; + final norm
    assert (c.layer_params, c.vocab_params, c.kv_elems_per_token, c.attn_flops_per_pair) == (156, 40, 4, 16)
    assert c.weight_bytes == 392


def test_slot_starts_take_the_first_free_slot_in_order():
    assert roofline.slot_starts([2, 0, 3, 1], max_num_seqs=2) == [0, 0, 0, 2]


def test_roofline_seconds_of_a_tiny_workload_one_slot():
    c = roofline.ModelCounts.from_config(TINY, dtype_bytes=2)
    r = roofline.workload_roofline(c, TWO, max_num_seqs=1, peak_flops=1000, copy_bytes_per_s=100)
    # prefill: 2*156*5 + 2*40*2 + 16*(6 + 3) = 1864 FLOPs; decode reads 392 B of weights + 8 B per K/V token:
    # A at 4 then 5 tokens, then B at 3 tokens (memory-bound at 1000 FLOP/s)
    assert r.prefill_s == pytest.approx(1.864)
    assert (r.decode_steps, r.output_tokens) == (3, 5)
    assert r.decode_s == pytest.approx(4.24 + 4.32 + 4.16) and r.decode_memory_s == pytest.approx(12.72)
    assert r.output_tokens_per_s == pytest.approx(5 / (1.864 + 12.72))


def test_roofline_batches_slots_and_takes_compute_when_it_is_slower():
    c = roofline.ModelCounts.from_config(TINY, dtype_bytes=2)
    two_slots = roofline.workload_roofline(c, TWO, max_num_seqs=2, peak_flops=1000, copy_bytes_per_s=100)
    assert two_slots.decode_steps == 2 and two_slots.decode_s == pytest.approx(4.48 + 4.32)
    slow = roofline.workload_roofline(c, TWO, max_num_seqs=1, peak_flops=100, copy_bytes_per_s=100)
    # per step 2*196 FLOPs of weights + 16 per K/V token: 456, 472, 440 FLOPs > the 424, 432, 416 bytes
    assert slow.decode_s == pytest.approx(4.56 + 4.72 + 4.40) and slow.decode_memory_s == pytest.approx(12.72)


def test_output_digests_tell_requests_apart_one_crc_each():
    same = throughput.output_digests([[1, 2, 3], [4]])
    assert len(same) == 16 and same == throughput.output_digests([[1, 2, 3], [4]])
    other = throughput.output_digests([[1, 2, 3], [5]])
    assert other[:8] == same[:8] and other[8:] != same[8:]


def test_padding_shares_and_engine_lists():
    shares = throughput.padding_shares({"tokens": 30, "padding_tokens": 10, "rows": 3, "padding_rows": 1})
    assert (shares["padding_tokens_pct"], shares["padding_rows_pct"]) == (25.0, 25.0)
    assert throughput.padding_shares({}) == {}
    assert throughput.parse_args(["--engine", "jaxpaged,hf"]).engine == ["jaxpaged", "hf"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--engine", "jaxpaged,vllm"])


class _CountingEngine:
    """Three steps of work; each step calls `_bookkeeping` 5 times."""

    def __init__(self):
        self.left = 3

    def has_unfinished_requests(self):
        return self.left > 0

    def _bookkeeping(self):
        return sum(range(100))

    def step(self):
        for _ in range(5):
            self._bookkeeping()
        self.left -= 1


def test_host_profile_reports_calls_per_step_and_stops_with_the_work():
    profile = step_profile.host_profile(_CountingEngine(), num_steps=10)
    row = next(v for k, v in profile.items() if k.endswith("(_bookkeeping)"))
    assert row["calls"] == 5  # 15 calls over the 3 steps the engine had, not the 10 asked for
    assert row["cum_ms"] >= row["self_ms"] >= 0
    assert step_profile.host_profile(_CountingEngine.__new__(_CountingEngine), 0) == {}


def test_timed_steps_stop_with_the_work_and_count_no_wait_without_results():
    times, waits, wall = step_profile.timed_steps(_CountingEngine(), num_steps=10)
    assert len(times) == len(waits) == 3  # the engine had 3 steps of work
    assert waits == [0, 0, 0]  # no StepHandle.result() was waited on
    assert wall >= sum(times) > 0
    window = step_profile._window(times, waits, wall, {"decode": [0.002, 0.004], "update": [0.003]})
    assert window["steps"] == 3 and window["host_work_ms_per_step"] == window["host_ms_per_step"]
    assert window["dispatch_ms_per_step"] == pytest.approx({"decode": 2.0, "update": 1.0})
    assert window["dispatch_calls_per_step"] == pytest.approx({"decode": 2 / 3, "update": 1 / 3})


class _Runner:
    """The part of ModelRunner that `timed_dispatches` touches."""

    def __init__(self):
        self.executables = {("decode", 8): lambda x: x + 1, ("update",): lambda x: x * 2}


def test_timed_dispatches_time_each_program_call_and_restore_the_programs():
    runner, seconds = _Runner(), {}
    originals = dict(runner.executables)
    with step_profile.timed_dispatches(runner, seconds):
        assert runner.executables[("decode", 8)](1) == 2 and runner.executables[("decode", 8)](5) == 6
        assert runner.executables[("update",)](3) == 6
    assert {k: len(v) for k, v in seconds.items()} == {"decode": 2, "update": 1}
    assert all(t >= 0 for v in seconds.values() for t in v)
    assert runner.executables == originals


def test_host_loop_runs_the_steady_decode_of_a_small_workload(capsys):
    """4 requests of 20 + 24 tokens, 4-token steps: two single steps prefill them (64-token budget) and sample one
    or two tokens each, then six multi-steps take the other 22-23 (the last one partly)."""
    record = host_loop.main(["--num-requests", "4", "--input-len", "20", "--output-len", "24",
                             "--num-scheduler-steps", "4", "--page-size", "4", "--max-num-batched-tokens", "64",
                             "--repeats", "2"])
    assert record["decode_steps"] == 6
    assert set(record["ms_per_decode_step"]) == {"schedule", "layout", "process"}
    assert record["host_ms_per_decode_step"] == pytest.approx(sum(record["ms_per_decode_step"].values()))
    assert '"part": "host_loop"' in capsys.readouterr().out


def test_host_loop_times_single_decode_steps_without_multi_steps():
    """The same workload in single steps: the first prefills 3 requests and 4 tokens of the last, the second
    prefills the rest beside 3 decodes; the last request's 24th token comes in step 25: 23 decode-only steps."""
    record = host_loop.main(["--num-requests", "4", "--input-len", "20", "--output-len", "24",
                             "--num-scheduler-steps", "1", "--page-size", "4", "--max-num-batched-tokens", "64",
                             "--repeats", "1"])
    assert record["decode_steps"] == 23


def test_host_loop_reports_the_schedule_with_and_without_multi_steps_over_prefills():
    """8 prompts of 20 tokens, 64-token steps: the first two steps prefill 125 of the 160 prompt tokens (a burst: single
    steps either way); the third holds the rest and 6 decodes, a multi-step with prefill only with the flag; then six
    4-token decodes of 8 rows (8-row bucket) each."""
    flags = ["--num-requests", "8", "--input-len", "20", "--output-len", "24", "--num-scheduler-steps", "4",
             "--page-size", "4", "--max-num-batched-tokens", "64", "--repeats", "1"]
    assert host_loop.main(flags)["schedule"] == {
        "single_steps": 3, "multi_steps": 6, "multi_steps_with_prefill": 0, "multi_step_rows": 6 * 4 * 8}
    assert host_loop.main(flags + ["--multi-step-with-prefill"])["schedule"] == {
        "single_steps": 2, "multi_steps": 6, "multi_steps_with_prefill": 1, "multi_step_rows": 7 * 4 * 8}


class _TimelineLLM:
    """`generate` steps an engine that launches a prefill step, a one-token decode of 2 rows, a 4-token multi-step,
    then nothing (the last step only collects)."""

    def __init__(self):
        from types import SimpleNamespace as NS
        self.launches = [NS(num_tokens=40, requests=[1, 2], num_steps=1), NS(num_tokens=2, requests=[1, 2],
                         num_steps=1), NS(num_tokens=2, requests=[1, 2], num_steps=4), None]
        self.llm_engine = self
        self._in_flight = None
        self.generated = None

    def step(self):
        sched = self.launches.pop(0)
        self._in_flight = None if sched is None else type("Handle", (), {"sched": sched})()
        return []

    def generate(self, prompts, params, use_tqdm):
        self.generated = (prompts, params, use_tqdm)
        while self.launches:
            self.llm_engine.step()


def test_timeline_times_generate_step_by_step_and_sums_by_kind():
    llm = _TimelineLLM()
    record = step_profile.timeline(llm, ["p"], ["sp"])
    assert llm.generated == (["p"], ["sp"], False) and "step" not in vars(llm)  # the engine's own step again
    assert [r[:3] for r in record["step_rows"]] == [[40, 2, 1], [2, 2, 1], [2, 2, 4], [0, 0, 0]]
    assert {k: v["steps"] for k, v in record["by_kind"].items()} == {"prefill": 1, "decode": 1, "multi": 1,
                                                                     "none": 1}
    assert record["steps"] == 4 and record["wait_s"] == 0
    assert record["generate_s"] >= record["steps_s"] >= record["host_work_s"] >= 0
    assert record["queue_s"] >= 0 and record["tail_s"] >= 0
    assert record["queue_s"] + record["steps_s"] + record["tail_s"] <= record["generate_s"]
