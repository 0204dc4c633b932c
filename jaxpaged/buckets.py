"""Padded batch shapes: a small fixed set of (tokens, sequences) buckets compiled once."""

import dataclasses


def _powers_of_two(start: int, limit: int) -> list[int]:
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Token buckets are powers of two from 16 up to `max_num_batched_tokens`, sequence buckets from 8 up to
    `max_num_seqs` (the top bucket is the limit itself), as vllm-project/tpu-inference pads them."""

    max_num_batched_tokens: int
    max_num_seqs: int

    @property
    def token_sizes(self) -> list[int]:
        return _powers_of_two(16, self.max_num_batched_tokens)

    @property
    def seq_sizes(self) -> list[int]:
        return _powers_of_two(8, self.max_num_seqs)

    def num_tokens(self, n: int) -> int:
        return next(b for b in self.token_sizes if b >= n)

    def num_seqs(self, n: int) -> int:
        return next(b for b in self.seq_sizes if b >= n)

    def all_shapes(self) -> list[tuple[int, int]]:
        """Every (token bucket, sequence bucket) a step can use: a batch of T tokens holds at most T sequences."""
        shapes = []
        for t in self.token_sizes:
            top = self.num_seqs(min(t, self.max_num_seqs))
            shapes += [(t, s) for s in self.seq_sizes if s <= top]
        return shapes
