"""The latency model of one simulated engine: llm-d's simulator's calculators and formulas.

Time to first token, by `--latency-calculator`:

- `constant`: `--time-to-first-token` x load;
- `per-token`: (`--prefill-overhead` + uncached prompt tokens x `--prefill-time-per-token`)
  x load;
- unset (`""`, the default): `per-token` while `--time-to-first-token` and its std-dev are 0,
  else `constant`.

A disaggregated decode request (`kv_transfer_params.do_remote_prefill`) fetches its prompt's
KV instead of computing it: its TTFT is `--kv-cache-transfer-latency` (constant), or prompt
tokens x `--kv-cache-transfer-time-per-token` (per-token; unset: while the constant and its
std-dev are 0), without the load factor.

Every further token comes `--inter-token-latency` x load after the previous one.

load = 1 + (F - 1) x (running - 1) / (max_num_seqs - 1), F = `--time-factor-under-load`: 1
when one request runs, F when `--max-num-seqs` do. Each value is jittered by a normal draw
with the matching `*-std-dev` (the per-token ones with `--prefill-time-std-dev` and
`--kv-cache-transfer-time-std-dev`), clamped to ±70% of its mean.
"""

_JITTER_CLAMP = 0.7


class Latency:
    """The latency model of one engine; reads `config` on every call, so a configuration
    swapped in by POST /admin/config applies to the next token."""

    def __init__(self, config):
        self.config = config

    def load(self, running):
        factor, seqs = self.config.time_factor_under_load, self.config.max_num_seqs
        if seqs <= 1 or factor == 1.0:
            return 1.0
        return 1.0 + (factor - 1.0) * (max(running, 1) - 1) / (seqs - 1)

    @staticmethod
    def jitter(rng, mean, std_dev):
        if not std_dev or not mean:
            return mean
        value = rng.gauss(mean, std_dev)
        return min(max(value, mean * (1 - _JITTER_CLAMP)), mean * (1 + _JITTER_CLAMP))

    def _per_token(self, constant, constant_std_dev):
        calculator = self.config.latency_calculator
        return calculator == "per-token" or (calculator == "" and not constant and not constant_std_dev)

    def time_to_first_token(self, rng, prompt_tokens, cached_tokens, running, remote_prefill=False):
        c = self.config
        if remote_prefill:
            if self._per_token(c.kv_cache_transfer_latency, c.kv_cache_transfer_latency_std_dev):
                return self.jitter(rng, prompt_tokens * c.kv_cache_transfer_time_per_token,
                                   c.kv_cache_transfer_time_std_dev)
            return self.jitter(rng, c.kv_cache_transfer_latency, c.kv_cache_transfer_latency_std_dev)
        load = self.load(running)
        if self._per_token(c.time_to_first_token, c.time_to_first_token_std_dev):
            mean = (c.prefill_overhead + (prompt_tokens - cached_tokens) * c.prefill_time_per_token) * load
            return self.jitter(rng, mean, c.prefill_time_std_dev)
        return self.jitter(rng, c.time_to_first_token * load, c.time_to_first_token_std_dev)

    def inter_token(self, rng, running):
        c = self.config
        return self.jitter(rng, c.inter_token_latency * self.load(running), c.inter_token_latency_std_dev)
