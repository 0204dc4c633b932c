"""HF transformers baselines on the same requests as jaxpaged: eager `generate`, and static cache + torch.compile.

Both run the requests in order, in static batches of `batch_size`, prompts left-padded with an attention mask,
greedy, exactly `max_new_tokens` per batch (min_new_tokens = max_new_tokens: no early stop). A batch is generated
to the longest output among its requests, but only each request's own output length counts as useful output
(`output_tokens`); `generated_tokens` counts everything HF generated, padding rows and overrun included.

  * eager: each batch padded to its own longest prompt and generated to its own longest output (dynamic cache);
  * compiled: `cache_implementation="static"` with a `compile_config` (fullgraph, mode "reduce-overhead": CUDA
    graphs). In transformers 5.x `generate` then compiles the decode step itself and keeps the prefill eager
    (its cache code says prefill should not be compiled); the older recipe `model.forward = torch.compile(...)`
    would compile every prefill shape too. Every batch has one shape (all prompts padded to the run's longest,
    every batch generated to the run's longest output, a short last batch filled with copies of its first
    request) so that nothing recompiles. Two full-size batches before timing compile it: `compile_seconds` (those
    two batches, compilation included; printed as soon as they are done), `compiled_graphs` (graphs compiled by
    then; 0 would mean generate did not compile) and `recompiles_during_timing` (graphs compiled after; expected 0).
"""

import os
import time

from results import emit
from workloads import BenchRequest

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor-cache")

_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32",
                 "float": "float32"}


def load_hf_model(model: str, load_format: str, dtype: str, device):
    """A HF causal LM: the checkpoint of a HF directory or a .gguf file (unless load_format is "dummy"), else
    random weights of its config or of a shipped config name (jaxpaged's llama-3.2-1b, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxpaged.models import ModelConfig
    from jaxpaged.models.loader import shipped_config

    torch_dtype = getattr(torch, _TORCH_DTYPES.get(dtype, "bfloat16"))
    if model.endswith(".gguf"):  # transformers dequantises the file itself (its gguf_file option)
        folder, name = os.path.split(os.path.abspath(model))
        if load_format == "dummy":
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch_dtype)
        else:
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    elif os.path.isdir(model) and load_format != "dummy":
        hf = AutoModelForCausalLM.from_pretrained(model, dtype="auto" if dtype == "auto" else torch_dtype)
    elif os.path.isdir(model):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch_dtype)
    else:
        fields = _hf_fields(ModelConfig.from_hf(shipped_config(model)))
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields), dtype=torch_dtype)
    if hf.generation_config.pad_token_id is None:
        hf.generation_config.pad_token_id = 0
    return hf.to(device).eval()


def _hf_fields(cfg) -> dict:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings")
    out = {f: getattr(cfg, f) for f in fields}
    if getattr(cfg, "rope_scaling", None):
        out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


def left_padded(batch: list[BenchRequest], width: int, rows: int, pad_id: int):
    """(input_ids, attention_mask), both [rows, width] int64: prompts right-aligned after pad_id / mask 0; rows past
    len(batch) repeat batch[0]."""
    import torch

    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i in range(rows):
        prompt = batch[i if i < len(batch) else 0].prompt_token_ids
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def _generate(model, batch: list[BenchRequest], shape: tuple[int, int, int] | None) -> int:
    """Generates one batch; shape (rows, prompt width, new tokens) is fixed, or None for the batch's own. Returns
    the tokens generated (rows * new tokens)."""
    import torch

    rows, width, new = shape or (len(batch), max(len(r.prompt_token_ids) for r in batch),
                                 max(r.output_len for r in batch))
    ids, mask = left_padded(batch, width, rows, model.generation_config.pad_token_id)
    with torch.no_grad():
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False)
    return rows * new


def _use_static_compile(model) -> None:
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    if model.device.type == "cpu":
        config._compile_all_devices = True  # generate() compiles on accelerators only unless told (CPU smoke runs)
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_hf(args, requests: list[BenchRequest], compiled: bool) -> dict:
    """Times HF on `requests` (the first `args.hf_max_requests` of them when set), batches of args.hf_batch_size."""
    import torch
    from torch._dynamo.utils import counters

    model = load_hf_model(args.model, args.load_format, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    run = requests[: args.hf_max_requests] if args.hf_max_requests else requests
    bs = args.hf_batch_size
    batches = [run[i:i + bs] for i in range(0, len(run), bs)]
    shape, extra = None, {}
    start = time.perf_counter()
    if compiled:
        _use_static_compile(model)
        shape = (bs, max(len(r.prompt_token_ids) for r in run), max(r.output_len for r in run))
        for _ in range(2):
            _generate(model, batches[0], shape)
    else:
        _generate(model, [BenchRequest(r.prompt_token_ids, 4) for r in batches[0][:8]], None)  # warm up
    _sync(torch)
    graphs = counters["stats"]["unique_graphs"]
    if compiled:
        extra = {"compile_seconds": time.perf_counter() - start, "compiled_graphs": graphs}
        emit({"part": "hf_warmup", "engine": "hf-compiled", **extra}, "throughput")
    start = time.perf_counter()
    generated = sum(_generate(model, b, shape) for b in batches)
    _sync(torch)
    elapsed = time.perf_counter() - start
    if compiled:
        extra["recompiles_during_timing"] = counters["stats"]["unique_graphs"] - graphs
    useful = sum(r.output_len for r in run)
    prompt = sum(len(r.prompt_token_ids) for r in run)
    return {"engine": "hf-compiled" if compiled else "hf-transformers", "seconds": elapsed,
            "requests_per_s": len(run) / elapsed, "output_tokens_per_s": useful / elapsed,
            "total_tokens_per_s": (useful + prompt) / elapsed, "output_tokens": useful,
            "generated_tokens": generated, "requests_run": len(run), "requests_total": len(requests),
            "subset": len(run) < len(requests), "device": str(model.device), **extra}
