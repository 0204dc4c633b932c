"""Offline throughput (vLLM's `benchmarks/throughput.py` convention): N requests of fixed input/output lengths.

    python benchmarks/throughput.py --model llama-3.2-1b --load-format dummy --num-prompts 256 \
        --input-len 256 --output-len 128 [--engine hf]

Prints one JSON line: requests/s and output tokens/s of jaxpaged or (--engine hf) of HF transformers `generate`
on the same config and device (torch, batches of --hf-batch-size, same lengths). Run both in one device command,
one process each (JAX and torch would fight over device memory), and report the ratio.
"""

import argparse
import json
import os
import time

import numpy as np


os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 30000), size=(num, length)).tolist()


def run_jaxpaged(args) -> dict:
    from jaxpaged import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              attention_impl=args.attention_impl)
    vocab = llm.llm_engine.model.config.vocab_size
    prompts = [{"prompt_token_ids": p} for p in _prompts(args.num_prompts, args.input_len, vocab, 0)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(8, len(prompts))], params, use_tqdm=False)  # warm the host path
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "jaxpaged", "seconds": elapsed, "requests_per_s": len(outs) / elapsed,
            "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + args.num_prompts * args.input_len) / elapsed}


def run_hf(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxpaged.models import ModelConfig
    from jaxpaged.models.loader import shipped_config

    hf_config = AutoConfig.for_model("llama", **_hf_fields(ModelConfig.from_hf(shipped_config(args.model))))
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.bfloat16).cuda().eval()
    prompts = torch.tensor(_prompts(args.num_prompts, args.input_len, hf_config.vocab_size, 0), device="cuda")
    total = 0
    with torch.no_grad():
        model.generate(prompts[:8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in prompts.split(args.hf_batch_size):
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False)
            total += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"engine": "hf-transformers", "seconds": elapsed, "requests_per_s": args.num_prompts / elapsed,
            "output_tokens_per_s": total / elapsed,
            "total_tokens_per_s": (total + args.num_prompts * args.input_len) / elapsed}


def _hf_fields(cfg) -> dict:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings")
    out = {f: getattr(cfg, f) for f in fields}
    if getattr(cfg, "rope_scaling", None):
        out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--engine", choices=("jaxpaged", "hf"), default="jaxpaged")
    p.add_argument("--hf-batch-size", type=int, default=64)
    args = p.parse_args()
    result = run_jaxpaged(args) if args.engine == "jaxpaged" else run_hf(args)
    print(json.dumps({**result, "args": vars(args)}))


if __name__ == "__main__":
    main()
