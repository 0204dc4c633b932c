"""Host side of sampling: per-sequence rows of a step packed into padded `SamplingTensors`."""

import dataclasses

import numpy as np

from jaxpaged.sampler import SamplingTensors


def _width(n: int, minimum: int) -> int:
    """Power-of-two width >= n for the rarely used 2-D sampling arrays (few distinct shapes)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class SeqSampling:
    """Host-side sampling state of one scheduled sequence that samples this step."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    position: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    penalty_tokens: list[int] | None  # prompt + output ids when the request has penalties
    num_prompt_tokens: int
    banned_tokens: list[int]


@dataclasses.dataclass
class HostSampling:
    """The step's per-sequence sampling rows (in batch order), turned into padded device arrays."""

    rows: list[SeqSampling]

    def to_tensors(self, num_seqs: int) -> SamplingTensors:
        def col(name, dtype, fill):
            arr = np.full(num_seqs, fill, dtype)
            arr[:len(self.rows)] = [getattr(r, name) for r in self.rows]
            return arr

        pen = [r.penalty_tokens or [] for r in self.rows]
        width = _width(max(map(len, pen), default=0), 64) if any(pen) else 1
        banned_width = _width(max((len(r.banned_tokens) for r in self.rows), default=0), 8)
        return SamplingTensors(
            temperature=col("temperature", np.float32, 0.0),
            top_p=col("top_p", np.float32, 1.0),
            top_k=col("top_k", np.int32, 0),
            min_p=col("min_p", np.float32, 0.0),
            seeds=col("seed", np.uint32, 0),
            positions=col("position", np.int32, 0),
            presence_penalty=col("presence_penalty", np.float32, 0.0),
            frequency_penalty=col("frequency_penalty", np.float32, 0.0),
            repetition_penalty=col("repetition_penalty", np.float32, 1.0),
            penalty_tokens=_pad_rows(pen, num_seqs, width),
            num_prompt_tokens=col("num_prompt_tokens", np.int32, 0),
            banned_tokens=_pad_rows([r.banned_tokens for r in self.rows], num_seqs, banned_width),
        )


def _pad_rows(rows: list[list[int]], num_rows: int, width: int) -> np.ndarray:
    out = np.full((num_rows, width), -1, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out

