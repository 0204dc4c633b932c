"""Online serving benchmark as vLLM's `vllm bench serve`, against `jaxpaged serve` (or any OpenAI-compatible server).

    python benchmarks/serving.py --num-prompts 200 --request-rate 16 --max-concurrency 64 \
        --random-input-len 512 --random-output-len 128 --random-range-ratio 0.5 [--host H --port P]
    python benchmarks/serving.py --launch "--model llama-3.2-1b --load-format dummy --dtype bfloat16" ...
    python benchmarks/serving.py --dataset nano-vllm --num-prompts 512 --rate-fraction 0.8 ...

Streams every request from /v1/completions (prompt as token ids, ignore_eos, max_tokens = its output length,
stream_options.include_usage). Requests arrive as a Poisson process of --request-rate per second (inf: all at
once), at most --max-concurrency in flight. Metrics as vLLM's: TTFT is the time to the first chunk with non-empty
`choices` (its text may be empty, as it is for a model without a tokenizer), ITL the gaps between such chunks, E2EL
the time to the last one, TPOT = (E2EL - TTFT) / (output tokens - 1), output tokens from the usage chunk. One
untimed request goes first (vLLM's initial test run; it also warms the server). While a run lasts, /metrics is read
every 0.1 s for `vllm:num_requests_running` (mean and median reported: the batch size the TPOT was measured at).

--rate-fraction F runs the workload twice: first all at once (the server's maximum request throughput), then with
Poisson arrivals at F times the request throughput just measured (e.g. 0.8: serving at 80 % of the maximum).

--launch ARGS starts `python -m jaxpaged.server ARGS --host --port` (log: $OUT/server.log or
/tmp/jaxpaged_server.log), reports the seconds until /health is 200, runs, then stops it (--timed-server: through
benchmarks/timed_server.py, which timestamps the log and logs each start-up phase). Prints vLLM's result
block and JSON lines (also appended to $OUT/serving.jsonl when $OUT is set).
"""

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from results import emit
from sse_http import SSEParser, stream_post
from workloads import BenchRequest, nano_vllm_requests, random_requests, workload_summary

RUNNING_METRIC = "vllm:num_requests_running"


@dataclasses.dataclass
class RequestResult:
    """One streamed request: the times (perf_counter seconds) of its chunks that carried choices."""

    prompt_len: int
    start: float = 0.0
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error and bool(self.chunk_times)


def request_timing(r: RequestResult) -> tuple[float, list[float], float, float | None]:
    """(TTFT, ITLs, E2EL, TPOT or None when fewer than 2 output tokens) of a successful request, in seconds."""
    ttft, e2el = r.chunk_times[0] - r.start, r.chunk_times[-1] - r.start
    itl = np.diff(r.chunk_times).tolist()
    tpot = (e2el - ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None
    return ttft, itl, e2el, tpot


def _stats(name: str, seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if not ms.size:
        return {f"{k}_{name}_ms": 0.0 for k in ("mean", "median", "std", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(results: list[RequestResult], duration: float) -> dict:
    """vLLM bench serve's metrics (names as in its JSON) of the requests of a run of `duration` seconds."""
    ok = [r for r in results if r.success]
    timings = [request_timing(r) for r in ok]
    inputs, outputs = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
            "total_input_tokens": inputs, "total_output_tokens": outputs,
            "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
            "total_token_throughput": (inputs + outputs) / duration,
            **_stats("ttft", [t[0] for t in timings]), **_stats("tpot", [t[3] for t in timings if t[3] is not None]),
            **_stats("itl", [x for t in timings for x in t[1]]), **_stats("e2el", [t[2] for t in timings])}


def print_report(m: dict, max_concurrency: int | None) -> None:
    """vLLM's "Serving Benchmark Result" block."""
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    rows = [("Successful requests:", m["completed"], "d"), ("Failed requests:", m["failed"], "d")]
    if max_concurrency:
        rows.append(("Maximum request concurrency:", max_concurrency, "d"))
    rows += [("Benchmark duration (s):", m["duration"], ".2f"), ("Total input tokens:", m["total_input_tokens"], "d"),
             ("Total generated tokens:", m["total_output_tokens"], "d"),
             ("Request throughput (req/s):", m["request_throughput"], ".2f"),
             ("Output token throughput (tok/s):", m["output_throughput"], ".2f"),
             ("Total Token throughput (tok/s):", m["total_token_throughput"], ".2f")]
    for label, value, fmt in rows:
        print(f"{label:<40} {value:<10{fmt}}")
    for key, label, title in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency")):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            print(f"{f'{name} {label} (ms):':<40} {m[f'{stat}_{key}_ms']:<10.2f}")
    print("=" * 50, flush=True)


async def send_request(args, model: str, req: BenchRequest) -> RequestResult:
    """Streams one completion; records the arrival time of each chunk with choices and the usage's token count."""
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result = RequestResult(prompt_len=len(req.prompt_token_ids), start=time.perf_counter())
    parser, usage = SSEParser(), None
    try:
        async for data in stream_post(args.host, args.port, args.endpoint, body, headers):
            now = time.perf_counter()
            for event in parser.feed(data):
                if event.strip() == "[DONE]":
                    continue
                chunk = json.loads(event)
                if chunk.get("choices"):
                    result.chunk_times.append(now)
                elif chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif chunk.get("error"):
                    result.error = str(chunk["error"])
    except Exception as e:  # a failed request is counted, not fatal (as in vLLM)
        result.error = f"{type(e).__name__}: {e}"
    result.output_tokens = usage if usage is not None else len(result.chunk_times)
    return result


def gauge_value(metrics_text: str, name: str) -> float | None:
    """The value of the first sample of gauge `name` in a Prometheus text exposition, None when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def poll_running(args, samples: list[float], stop: asyncio.Event) -> None:
    """Appends the server's running-request count to `samples` every 0.1 s until `stop` is set."""
    while not stop.is_set():
        status, body = await asyncio.to_thread(http_get, args, "/metrics", 2.0)
        value = gauge_value(body.decode(errors="replace"), RUNNING_METRIC) if status == 200 else None
        if value is not None:
            samples.append(value)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.1)
        except TimeoutError:
            pass


async def run_benchmark(args, model: str, requests: list[BenchRequest],
                        rate: float) -> tuple[list[RequestResult], float, list[float]]:
    """Sends `requests` at Poisson arrival times (`rate` per second, seeded; inf: all at once), at most
    --max-concurrency at once; returns their results, the run's wall seconds and the running-request counts
    sampled meanwhile."""
    rng = np.random.default_rng(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def limited(req: BenchRequest) -> RequestResult:
        if limit is None:
            return await send_request(args, model, req)
        async with limit:
            return await send_request(args, model, req)

    samples, stop = [], asyncio.Event()
    poller = asyncio.create_task(poll_running(args, samples, stop))
    start, tasks = time.perf_counter(), []
    for req in requests:
        tasks.append(asyncio.create_task(limited(req)))
        if rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    stop.set()
    await poller
    return results, duration, samples


def http_get(args, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when the server cannot be reached."""
    req = urllib.request.Request(f"http://{args.host}:{args.port}{path}",
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def launch_server(args) -> tuple[subprocess.Popen, float]:
    """Starts `python -m jaxpaged.server` with --launch's flags; returns it and the seconds until /health was 200."""
    out = os.environ.get("OUT")
    log_path = os.path.join(out, "server.log") if out else "/tmp/jaxpaged_server.log"
    entry = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "timed_server.py")] if args.timed_server \
        else ["-m", "jaxpaged.server"]
    cmd = [sys.executable, *entry, *shlex.split(args.launch), "--host", args.host, "--port", str(args.port)]
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while http_get(args, "/health", timeout=2.0)[0] != 200:
        if proc.poll() is not None or time.perf_counter() - start > args.ready_timeout:
            stop_server(proc)
            with open(log_path, "rb") as log:
                tail = log.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"the server did not become ready ({' '.join(cmd)}); log {log_path}:\n{tail}")
        time.sleep(0.5)
    return proc, time.perf_counter() - start


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def served_model(args) -> str:
    """--model, else the first model /v1/models lists."""
    if args.model:
        return args.model
    status, body = http_get(args, "/v1/models")
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered {status}: {body[:300]!r}; pass --model")
    return json.loads(body)["data"][0]["id"]


def bench_requests(args) -> list[BenchRequest]:
    """--dataset's requests: vLLM's random dataset or nano-vllm's ragged workload."""
    if args.dataset == "nano-vllm":
        return nano_vllm_requests(args.num_prompts, args.vocab_size, args.seed)
    return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, args.vocab_size, args.seed)


def timed_run(args, model: str, requests: list[BenchRequest], rate: float) -> dict:
    """One timed run at `rate` requests/s; prints the report and returns the metrics."""
    results, duration, running = asyncio.run(run_benchmark(args, model, requests, rate))
    metrics = compute_metrics(results, duration)
    print_report(metrics, args.max_concurrency)
    errors = sorted({r.error for r in results if r.error})[:3]
    return {"model": model, "request_rate": rate, **metrics,
            "mean_running": float(np.mean(running)) if running else None,
            "median_running": float(np.median(running)) if running else None,
            "errors": errors, "workload": workload_summary(requests), "args": vars(args)}


def benchmark(args) -> list[dict]:
    """The initial test request, then the timed run (two with --rate-fraction); returns their metrics."""
    model = served_model(args)
    requests = bench_requests(args)
    test = asyncio.run(send_request(args, model, requests[0]))
    if not test.success:
        raise RuntimeError(f"the initial test request failed: {test.error or 'no output'}")
    if args.rate_fraction is None:
        return [timed_run(args, model, requests, args.request_rate)]
    saturated = timed_run(args, model, requests, float("inf"))
    return [saturated, timed_run(args, model, requests, args.rate_fraction * saturated["request_throughput"])]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the first model of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"))
    p.add_argument("--dataset", choices=("random", "nano-vllm"), default="random",
                   help="nano-vllm: prompt and output lengths uniform in 100..1024 (--random-* ignored)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below min(this, 30000)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--rate-fraction", type=float, default=None,
                   help="run all at once first, then at this fraction of the measured request throughput")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch", default=None, metavar="SERVER_ARGS",
                   help="start `python -m jaxpaged.server SERVER_ARGS` first and stop it afterwards")
    p.add_argument("--ready-timeout", type=float, default=1200.0, help="seconds to wait for /health (--launch)")
    p.add_argument("--timed-server", action="store_true",
                   help="--launch through benchmarks/timed_server.py: timestamped log lines, start-up phases")
    args = p.parse_args(argv)
    if args.rate_fraction is not None and not 0.0 < args.rate_fraction <= 1.0:
        p.error(f"--rate-fraction must be in (0, 1], got {args.rate_fraction}")
    return args


def main() -> None:
    args = parse_args()
    proc = None
    if args.launch is not None:
        proc, ready_s = launch_server(args)
        emit({"part": "server_ready", "seconds": ready_s, "launch": args.launch}, "serving")
    try:
        for record in benchmark(args):
            emit(record, "serving")
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
