"""On a GPU: the engine's greedy tokens with the Pallas kernel equal those with the pure-JAX reference.

    python benchmarks/engine_parity.py [MODEL ...]

Models: the tiny HF fixtures under tests/fixtures (float32), a dummy Llama-3.2-1B (float32, fixed seed), and any
MODEL given (a HF directory or GGUF file, text prompts; benchmarks/embedded_parts.sh brings the embedded GGUF).
Prints one line per model and exits non-zero on any mismatch.
"""

import os
import sys

import numpy as np

from jaxpaged import LLM, SamplingParams

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
MODELS = [(os.path.join(FIXTURES, name), "auto") for name in
          ("llama2_mha_untied", "llama31_gqa_tied_rope_scaling", "llama_head_dim_mqa", "qwen2_bias_gqa")]
MODELS.append(("llama-3.2-1b", "dummy"))
TEXT = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Paged attention keeps", "Hi"]


def greedy(model: str, load_format: str, impl: str, prompts) -> list[list[int]]:
    llm = LLM(model, load_format=load_format, dtype="float32", attention_impl=impl, max_model_len=256,
              max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 30, seed=0)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def main(extra: list[str]) -> int:
    rng = np.random.default_rng(0)
    failures = 0
    for model, fmt in MODELS + [(path, "auto") for path in extra]:
        vocab = 128 if fmt == "auto" else 32000
        prompts = TEXT if model in extra else [
            {"prompt_token_ids": rng.integers(0, vocab, size=n).tolist()} for n in (5, 23, 70, 1, 40)]
        try:
            gpu = greedy(model, fmt, "gpu", prompts)
        except ValueError as e:  # shapes the kernel does not take (e.g. head_dim 48)
            print(f"{os.path.basename(model)}: impl=gpu unsupported: {str(e)[:120]}", flush=True)
            continue
        ref = greedy(model, fmt, "reference", prompts)
        same = ref == gpu
        failures += not same
        print(f"{os.path.basename(model)}: impl=gpu {'==' if same else '!='} impl=reference "
              f"({sum(map(len, ref))} greedy tokens over {len(prompts)} prompts)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
