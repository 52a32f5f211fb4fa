"""vLLM's histogram buckets (vllm/v1/metrics/loggers.py), shared by the real and the fake
metrics of `kvcm sim`."""

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len):
    """vLLM's 1-2-5 series up to the context length."""
    buckets, exponent = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * exponent
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(value)
        exponent *= 10
