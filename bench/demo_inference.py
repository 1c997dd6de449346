"""How fast the demo models run here: prefill and per-output-token time, and a 3x3 design.

Prints, per demo model: time to first token for 8 and 128 input tokens, the marginal
time per output token (from 8 and 72 output tokens), and the wall time of one pass over
the design {8, 32, 128} x {8, 32, 128}. Each figure is the median of REPEATS runs.

    .venv/bin/python bench/demo_inference.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.backends import open_backend  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.energy.discovery import cpu_model_name, logical_cpu_count  # noqa: E402

DESIGN = [(i, o) for i in (8, 32, 128) for o in (8, 32, 128)]


def median_runtime_s(backend, input_tokens: int, output_tokens: int, repeats: int) -> float:
    return statistics.median(backend.generate(input_tokens, output_tokens).runtime_s for _ in range(repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"host: {cpu_model_name()}, {logical_cpu_count()} logical CPUs, {platform.platform()}")
    print(f"{'model':12} {'backend':12} {'params':>9} {'ttft@8':>9} {'ttft@128':>9} {'ms/out-token':>13} {'3x3 pass':>9}")
    for demo in ensure_demo_models():
        with open_backend(demo.backend, demo.path) as backend:
            backend.generate(8, 8)  # warm-up, discarded
            ttft_short = statistics.median(backend.generate(8, 1).runtime_s for _ in range(args.repeats))
            ttft_long = statistics.median(backend.generate(128, 1).runtime_s for _ in range(args.repeats))
            short = median_runtime_s(backend, 8, 8, args.repeats)
            long = median_runtime_s(backend, 8, 72, args.repeats)
            per_token_ms = (long - short) / 64 * 1e3
            started = time.perf_counter()
            for input_tokens, output_tokens in DESIGN:
                backend.generate(input_tokens, output_tokens)
            design_s = time.perf_counter() - started
        print(f"{demo.name:12} {demo.backend:12} {demo.params_b * 1e3:8.1f}M {ttft_short * 1e3:7.1f}ms "
              f"{ttft_long * 1e3:7.1f}ms {per_token_ms:11.2f}ms {design_s:8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
