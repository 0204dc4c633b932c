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
    `max_num_seqs` (the top bucket is the limit itself), as vllm-project/tpu-inference pads them.

    Which (tokens, sequences) pairs are compiled follows what a step can be and what padding costs: a step of T
    tokens holds at most T sequences, and from T >= `SEQ_PAD_RATIO` x max_num_seqs only the top sequence bucket
    is kept. There the padding sequence rows number at most 1/SEQ_PAD_RATIO of the step's token rows and cost
    only sampler rows and empty attention rows (the forward's GEMMs follow its tokens), and those are the largest
    programs to compile: for 256 sequences and 8192 tokens, 30 forward programs instead of 50.
    """

    SEQ_PAD_RATIO = 4

    max_num_batched_tokens: int
    max_num_seqs: int

    @property
    def token_sizes(self) -> list[int]:
        return _powers_of_two(16, self.max_num_batched_tokens)

    @property
    def seq_sizes(self) -> list[int]:
        return _powers_of_two(8, self.max_num_seqs)

    @property
    def first_token_sizes(self) -> list[int]:
        """Every other token bucket from the top: the forward programs a background warm-up compiles first. Every
        step fits one of them with at most twice its bucket's tokens."""
        return self.token_sizes[::-1][::2]

    def num_tokens(self, n: int) -> int:
        return next(b for b in self.token_sizes if b >= n)

    def num_seqs(self, n: int) -> int:
        return next(b for b in self.seq_sizes if b >= n)

    def shape(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The (token bucket, sequence bucket) of a step of `num_tokens` tokens in `num_seqs` rows."""
        t = self.num_tokens(num_tokens)
        return t, self.max_num_seqs if t >= self.SEQ_PAD_RATIO * self.max_num_seqs else self.num_seqs(num_seqs)

    def all_shapes(self) -> list[tuple[int, int]]:
        """Every (token bucket, sequence bucket) a step can use (`shape`'s values)."""
        shapes = []
        for t in self.token_sizes:
            if t >= self.SEQ_PAD_RATIO * self.max_num_seqs:
                shapes.append((t, self.max_num_seqs))
                continue
            top = self.num_seqs(min(t, self.max_num_seqs))
            shapes += [(t, s) for s in self.seq_sizes if s <= top]
        return shapes
