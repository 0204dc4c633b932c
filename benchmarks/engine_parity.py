"""On a GPU: the engine's greedy tokens with the Pallas kernel equal those with the pure-JAX reference.

    python benchmarks/engine_parity.py [--sharing] [MODEL ...]

--sharing also compares what runs on shared pages: n=4 seeded samples (forks, copy-on-write), a beam search of
width 3 and prompt logprobs (max abs difference, float32).

Models: the tiny HF fixtures under tests/fixtures (float32), a dummy Llama-3.2-1B (float32, fixed seed), and any
MODEL given (a HF directory or GGUF file, text prompts; benchmarks/embedded_parts.sh brings the embedded GGUF).
PARITY_MODELS=name,... keeps only the built-in models of those names (e.g. PARITY_MODELS=llama-3.2-1b: the dummy 1B
alone, which did not finish within 150 s after the four fixtures in a --sharing run on the H200).
Prints one line per model and exits non-zero on any mismatch.
"""

import os
import sys

import numpy as np

from jaxpaged import LLM, BeamSearchParams, SamplingParams

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
MODELS = [(os.path.join(FIXTURES, name), "auto") for name in
          ("llama2_mha_untied", "llama31_gqa_tied_rope_scaling", "llama_head_dim_mqa", "qwen2_bias_gqa")]
MODELS.append(("llama-3.2-1b", "dummy"))
if os.environ.get("PARITY_MODELS"):
    MODELS = [m for m in MODELS if os.path.basename(m[0]) in os.environ["PARITY_MODELS"].split(",")]
TEXT = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Paged attention keeps", "Hi"]


def engine(model: str, load_format: str, impl: str) -> LLM:
    return LLM(model, load_format=load_format, dtype="float32", attention_impl=impl, max_model_len=256,
               max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 30, seed=0)


def greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def shared(llm: LLM, prompts) -> tuple[list, list, np.ndarray]:
    """(n=4 samples, beams of width 3, prompt logprobs of the first prompt [T - 1]) of `prompts`."""
    samples = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))
    out = llm.generate(prompts[:1], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = np.array([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])
    return ([[c.token_ids for c in o.outputs] for o in samples], [[s.tokens for s in b.sequences] for b in beams],
            lps)


def main(extra: list[str], sharing: bool) -> int:
    rng = np.random.default_rng(0)
    failures = 0
    for model, fmt in MODELS + [(path, "auto") for path in extra]:
        vocab = 128 if fmt == "auto" else 32000
        prompts = TEXT if model in extra else [
            {"prompt_token_ids": rng.integers(0, vocab, size=n).tolist()} for n in (5, 23, 70, 1, 40)]
        try:
            gpu_llm = engine(model, fmt, "gpu")
            gpu = greedy(gpu_llm, prompts)
        except ValueError as e:  # shapes the kernel does not take (e.g. head_dim 48)
            print(f"{os.path.basename(model)}: impl=gpu unsupported: {str(e)[:120]}", flush=True)
            continue
        ref_llm = engine(model, fmt, "reference")
        ref = greedy(ref_llm, prompts)
        same = ref == gpu
        failures += not same
        print(f"{os.path.basename(model)}: impl=gpu {'==' if same else '!='} impl=reference "
              f"({sum(map(len, ref))} greedy tokens over {len(prompts)} prompts)", flush=True)
        if sharing:
            (s_gpu, b_gpu, lp_gpu), (s_ref, b_ref, lp_ref) = shared(gpu_llm, prompts), shared(ref_llm, prompts)
            diff = float(np.abs(lp_gpu - lp_ref).max())
            ok = s_gpu == s_ref and b_gpu == b_ref and diff < 1e-4
            failures += not ok
            print(f"{os.path.basename(model)}: sharing n=4 samples {'==' if s_gpu == s_ref else '!='}, beams "
                  f"{'==' if b_gpu == b_ref else '!='}, prompt logprobs max |diff| {diff:.2e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--")], "--sharing" in flags))
