"""How many tokens a random-mode answer has: llm-d's simulator's distributions.

- `ignore_eos`: the most it may have (`max_tokens`, else what the context leaves).
- With `max_tokens`: a histogram over 1..max_tokens. Five buckets hold 20%, 30%, 20%, 5% and
  10% of the answers, the sixth (exactly max_tokens, finish reason "length") the other 15%.
  Up to max_tokens = 101 the five are equal slices of 1..max_tokens-1; beyond, they are 20
  tokens wide except the fourth, which stretches over the rest. A length is uniform within
  its bucket; max_tokens of 6 or less is uniform over 1..max_tokens.
- Without: a normal draw of mean 40 and standard deviation 20 within 1..what the context
  leaves (uniform when that is under 20).

A request's `min_tokens` raises the result to at least that many.
"""

BUCKETS = (0.2, 0.3, 0.2, 0.05, 0.1, 0.15)
_CUMULATIVE = tuple(sum(BUCKETS[:i + 1]) for i in range(len(BUCKETS)))
FLEX_BUCKET = 3
FIXED_WIDTH = 20
MEAN, STD_DEV = 40, 20


def _bucket_bounds(max_tokens, bucket):
    equal = len(BUCKETS) - 1
    if max_tokens <= FIXED_WIDTH * equal + 1:
        width = (max_tokens - 1) / equal
        start, end = int(width * bucket) + 1, int(width * (bucket + 1))
    elif bucket < FLEX_BUCKET:
        start, end = FIXED_WIDTH * bucket + 1, FIXED_WIDTH * (bucket + 1)
    else:
        flex = max_tokens - FIXED_WIDTH * (len(BUCKETS) - 2)
        if bucket == FLEX_BUCKET:
            start, end = FIXED_WIDTH * bucket + 1, FIXED_WIDTH * bucket + flex
        else:
            start, end = FIXED_WIDTH * (bucket - 1) + flex + 1, FIXED_WIDTH * bucket + flex
    return start, min(end, max_tokens - 1)


def histogram_length(rng, max_tokens):
    """A length in 1..max_tokens from the bucket histogram."""
    if max_tokens <= 1:
        return max_tokens
    if max_tokens <= len(BUCKETS):
        return rng.randint(1, max_tokens)
    r = rng.random()
    if r > _CUMULATIVE[-2]:
        return max_tokens
    bucket = next(i for i, c in enumerate(_CUMULATIVE) if r <= c)
    start, end = _bucket_bounds(max_tokens, bucket)
    return rng.randint(start, max(start, end))


def open_length(rng, limit):
    """A length in 1..limit when the request sets no max_tokens."""
    if limit < MEAN - STD_DEV:
        return rng.randint(1, limit)
    while True:
        value = rng.gauss(MEAN, STD_DEV)
        if 1 <= value <= limit:
            return int(round(value))


def answer_length(rng, max_tokens, limit, ignore_eos=False, min_tokens=0):
    """(tokens, finish reason) of a random answer; `limit` is what the context leaves."""
    high = max_tokens if max_tokens is not None else limit
    if ignore_eos:
        count = high
    elif max_tokens is not None:
        count = histogram_length(rng, max_tokens)
    else:
        count = open_length(rng, limit)
    count = min(max(count, min_tokens), high)
    return count, "length" if count == high else "stop"
