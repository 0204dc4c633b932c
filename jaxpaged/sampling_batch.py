"""Host side of sampling: per-slot sampling parameters, kept for a request's life, gathered into a step's tensors.

A request's parameters are written once, when it takes a slot of the persistent batch; a step gathers the rows of
its scheduled slots with one NumPy take per column and packs them into two arrays (one float32, one int32), so a
step costs two host-to-device copies, not one per field.
"""

import jax
import numpy as np

from jaxpaged.sampler import SamplerFlags, SamplingTensors
from jaxpaged.sampling_params import SamplingParams

_EPS = 1e-5
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INT_FIELDS = ("top_k", "seeds", "num_prompt_tokens")


def _width(n: int, minimum: int) -> int:
    """Power-of-two width >= n for the rarely used 2-D sampling arrays (few distinct shapes)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def pad_rows(rows: list[list[int]], num_rows: int, minimum: int) -> np.ndarray:
    """[num_rows, W] int32, -1 padded, W a power of two >= the longest row (and >= minimum)."""
    width = _width(max(map(len, rows), default=0), minimum)
    out = np.full((num_rows, width), -1, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


class SamplingBatch:
    """Sampling parameters of `num_slots` request slots; slot `num_slots` is the neutral padding slot."""

    def __init__(self, num_slots: int):
        self.pad_slot = num_slots
        self.floats = np.zeros((len(FLOAT_FIELDS), num_slots + 1), np.float32)  # [F, slots + 1]
        self.ints = np.zeros((len(INT_FIELDS), num_slots + 1), np.int32)        # [I, slots + 1]
        self.logprobs = np.zeros(num_slots + 1, bool)
        self.set(self.pad_slot, SamplingParams(temperature=0.0), seed=0, num_prompt_tokens=0)

    def set(self, slot: int, p: SamplingParams, seed: int, num_prompt_tokens: int) -> None:
        """Writes one request's parameters into its slot."""
        for i, name in enumerate(FLOAT_FIELDS):
            self.floats[i, slot] = getattr(p, name)
        seed_bits = np.array(seed & 0xFFFFFFFF, np.uint32).view(np.int32)
        self.ints[:, slot] = (p.top_k if p.top_k > 0 else 0, seed_bits, num_prompt_tokens)
        self.logprobs[slot] = p.logprobs is not None

    def flags(self, slots: np.ndarray) -> SamplerFlags:
        """The sampler work the rows of `slots` [S] need."""
        f = self.floats[:, slots]
        random = bool(np.any(f[0] >= _EPS))
        filt = random and bool(np.any((self.ints[0, slots] > 0) | (f[1] < 1.0) | (f[2] > 0.0)))
        return SamplerFlags(random=random, filter=filt, logprobs=bool(np.any(self.logprobs[slots])))

    def gather(self, slots: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(floats [F, S], ints [I + 1, S]) of the rows `slots` [S]; `positions` [S] (output index sampled) last."""
        return self.floats[:, slots], np.concatenate([self.ints[:, slots], positions[None].astype(np.int32)])


def unpack_tensors(floats, ints, penalty_tokens, banned_tokens) -> SamplingTensors:
    """SamplingTensors from `SamplingBatch.gather`'s packed arrays (inside the jitted step)."""
    f = dict(zip(FLOAT_FIELDS, floats))
    top_k, seeds, num_prompt, positions = ints
    return SamplingTensors(
        temperature=f["temperature"], top_p=f["top_p"], top_k=top_k, min_p=f["min_p"],
        seeds=jax.lax.bitcast_convert_type(seeds, np.uint32), positions=positions,
        presence_penalty=f["presence_penalty"], frequency_penalty=f["frequency_penalty"],
        repetition_penalty=f["repetition_penalty"], penalty_tokens=penalty_tokens, num_prompt_tokens=num_prompt,
        banned_tokens=banned_tokens)
