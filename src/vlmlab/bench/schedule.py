"""When each request is sent: vLLM's arrival process (Poisson, or Gamma with a burstiness).

Reference: ``get_request`` in ``vllm/benchmarks/serve.py``. Inter-arrival gaps are drawn from
Gamma(shape = burstiness, scale = 1 / (rate * burstiness)), whose mean is 1/rate and whose
coefficient of variation is 1/sqrt(burstiness) (1 = exponential gaps, i.e. Poisson arrivals;
< 1 burstier, > 1 more even). The cumulative offsets are then rescaled so the last request goes
out at exactly N / rate: vLLM does this because the raw sum misses the target by 1-2 %, which
makes throughput figures wobble between seeds. As in vLLM, the first request also waits its
own gap (it is not pinned to t = 0).
"""

from __future__ import annotations

import math

import numpy as np

from vlmlab.protocol.errors import ConfigError


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start of the run, one per request, non-decreasing.

    Inputs: ``n`` requests at ``rate`` per second (``inf``: all at 0), Gamma shape
    ``burstiness``, RNG ``seed``. Output: ``n`` offsets; the last equals ``n / rate`` exactly
    (to float rounding) when the rate is finite.

    Raises:
        ConfigError: ``n`` negative, ``rate`` or ``burstiness`` not positive.
    """
    if n < 0:
        raise ConfigError(f"number of requests must be >= 0, got {n}")
    if not rate > 0 or not burstiness > 0:
        raise ConfigError(f"request rate and burstiness must be positive, got rate={rate}, burstiness={burstiness}")
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    if math.isinf(burstiness):  # the limit of ever more regular gaps: a constant rate
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    if offsets[-1] > 0:
        offsets *= (n / rate) / offsets[-1]
    return [float(t) for t in offsets]
