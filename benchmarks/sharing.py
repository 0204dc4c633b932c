"""KV pages that sharing saves: n parallel samples and beam searches of one long prompt, with and without forks.

    python benchmarks/sharing.py [--model M --load-format auto --dtype float32] [--prompt-len 1024]
        [--max-tokens 64] [--widths 2,4,8]

For each width k: `n=k` samples (temperature 1, seeded) and a beam search of width k, prefix caching off, and
as the baseline without sharing k independent requests of the same prompt (what the engine would hold without
forks and copy-on-write). The figure is the peak of KV pages in use, read after every engine step (a step's own
copy-on-writes are freed again inside it, so the peak inside a step can be up to k - 1 pages higher). Page counts
do not depend on the device. One JSON line per run (also appended to $OUT/sharing.jsonl when $OUT is set).
"""

import argparse

import numpy as np

from results import emit


def peak_pages(engine, add) -> tuple[int, int]:
    """(peak pages in use, peak page references saved by sharing) while `add(engine)`'s requests run."""
    free = engine.page_manager.num_free_pages
    add(engine)
    peak = saved = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, free - engine.page_manager.num_free_pages)
        saved = max(saved, engine.page_manager.num_shared_refs)
    return peak, saved


def main() -> None:
    from jaxpaged import LLM, BeamSearchParams, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--widths", default="2,4,8")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, enable_prefix_caching=False,
              max_model_len=args.prompt_len + args.max_tokens + 16, max_num_seqs=max(widths),
              max_num_batched_tokens=512, seed=0)
    engine = llm.llm_engine
    vocab = engine.model.config.vocab_size
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(100, vocab - 100, args.prompt_len).tolist()}
    sample = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    page_size = engine.page_manager.page_size
    for k in widths:
        runs = {
            "independent": lambda e, k=k: [e.add_request(f"alone-{k}-{i}", prompt, sample) for i in range(k)],
            "n": lambda e, k=k: e.add_request(f"n-{k}", prompt, SamplingParams(
                n=k, temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)),
            "beam": lambda e, k=k: e.add_beam_request(f"beam-{k}", prompt, BeamSearchParams(
                beam_width=k, max_tokens=args.max_tokens, ignore_eos=True)),
        }
        peaks = {}
        for name, add in runs.items():
            peaks[name], saved = peak_pages(engine, add)
            emit({"part": name, "width": k, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                  "page_size": page_size, "peak_pages": peaks[name], "peak_shared_refs": saved}, "sharing")
        for name in ("n", "beam"):
            emit({"part": "saving", "mode": name, "width": k, "pages_with_sharing": peaks[name],
                  "pages_without": peaks["independent"],
                  "saved_pct": round(100 * (1 - peaks[name] / peaks["independent"]), 1)}, "sharing")


if __name__ == "__main__":
    main()
