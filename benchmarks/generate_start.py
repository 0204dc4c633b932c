"""How long `LLM.generate` keeps the device waiting before its first step: the serial host work (prompt checks,
queueing) from the call to its first `engine.step()`, timed on this machine's CPU.

    python3 benchmarks/generate_start.py [--num-prompts 256] [--input-len 512] [--repeats 7]

The embedded model with dummy weights (the host work does not depend on the weights); each repeat queues fresh
random prompts, stops at the first step and aborts them. Reports every repeat's ms, sorted.
"""

import argparse
import time

import numpy as np

from results import emit


class _FirstStep(Exception):
    pass


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    from jaxpaged import LLM, SamplingParams

    llm = LLM(load_format="dummy", dtype="float32", max_model_len=args.input_len + 128,
              max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens)
    engine, rng, ms = llm.llm_engine, np.random.default_rng(0), []
    vocab = engine.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for _ in range(args.repeats):
        prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input_len).tolist()}
                   for _ in range(args.num_prompts)]
        start = time.perf_counter()

        def first_step():
            ms.append(1000 * (time.perf_counter() - start))
            raise _FirstStep

        engine.step = first_step
        try:
            llm.generate(prompts, params, use_tqdm=False)
        except _FirstStep:
            pass
        finally:
            del engine.step
        engine.abort_request(list(engine.groups))
    record = {"part": "generate_start", "ms_to_first_step": sorted(ms), "args": vars(args)}
    emit(record, "generate_start")
    return record


if __name__ == "__main__":
    main()
