"""How many CPU threads should inference use here? CPU time and wall time per request, by thread setting.

    .venv/bin/python bench/threads.py [--processes 2] [--repeats 5]

For each demo model and each thread setting, ``--processes`` fresh worker-like processes
(passive OpenMP waiting, as every worker runs) each load the model, warm it up and time
``--repeats`` requests of each shape; every process's median is printed, so the spread
between processes shows as well as the level. The settings:

* llama.cpp (`demo-large`): ``n_threads`` (one-token decode steps) / ``n_threads_batch``
  (prompts and batch steps): every logical CPU for both (what the backend used before),
  half for one-token steps and all for the others (llama-cpp-python's own default), and the
  default (:func:`engine.backends.base.thread_counts`: half the logical CPUs for both).
  Shapes: a short answer (10 in, 8 out), a long answer (8 in, 64 out), a long prompt
  (96 in, 32 out), and a batch of 16 of (96 in, 32 out) reported per request.
* transformers (`demo-small`): torch threads 2 (every logical CPU) and the default (half).

On a host without energy sensors CPU time is what the estimate multiplies by watts per CPU,
so "less CPU time" reads as "less estimated energy". The report is appended, dated, to
``bench/results/threads.txt``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import RESULTS, ROOT, Report, machine, uptime

sys.path.insert(0, str(ROOT))

from engine.backends.base import thread_counts  # noqa: E402
from engine.energy.estimate import logical_cpu_count  # noqa: E402
from engine.energy.waiting import worker_environment  # noqa: E402

SHAPES = ((10, 8, 1), (8, 64, 1), (96, 32, 1), (96, 32, 16))


def probe(model: str, threads: tuple[int, int] | None, repeats: int) -> dict:
    """In this process: load ``model`` with ``threads`` (None: the default), time each shape."""
    from engine.backends import open_backend
    from engine.backends.batch import ExactRequest
    from engine.demo_models import ensure_demo_models
    from engine.paths import DEFAULT_MODELS_DIR

    demo = {m.name: m for m in ensure_demo_models(DEFAULT_MODELS_DIR)}[model]
    options = {} if threads is None else {"n_threads": threads[0], "n_threads_batch": threads[1]}
    backend = open_backend(demo.backend, demo.path, "cpu", **options)
    backend.load()
    backend.generate(16, 8)
    backend.generate(16, 8)
    out = {"settings": {k: v for k, v in backend.settings.items() if "thread" in k}}
    for input_tokens, output_tokens, batch in SHAPES:
        if batch > 1 and demo.backend != "llama.cpp":
            continue
        cpu, wall = [], []
        for _ in range(repeats):
            started = time.process_time()
            if batch == 1:
                result = backend.generate(input_tokens, output_tokens)
            else:
                result = backend.generate_batch([ExactRequest(input_tokens, output_tokens)] * batch)
            cpu.append((time.process_time() - started) / batch)
            wall.append(result.runtime_s / batch)
        out[f"{input_tokens}/{output_tokens}x{batch}"] = [statistics.median(cpu), statistics.median(wall)]
    backend.close()
    return out


def run_probe(model: str, threads: tuple[int, int] | None, repeats: int) -> dict:
    config = json.dumps({"model": model, "threads": threads, "repeats": repeats})
    done = subprocess.run([sys.executable, __file__, "--probe", config], capture_output=True, text=True,
                          env=worker_environment(), cwd=ROOT, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per setting (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="requests of each shape per process (default 5)")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        config = json.loads(args.probe)
        threads = tuple(config["threads"]) if config["threads"] else None
        print(json.dumps(probe(config["model"], threads, config["repeats"])))
        return 0

    report = Report()
    allowed = logical_cpu_count()
    default = thread_counts({}, allowed)
    report.say(f"uptime: {uptime()}")
    report.say(f"{machine()}; {allowed} logical CPUs this process may use; default threads {default[0]}/{default[1]}")
    report.say("per request: median CPU-seconds / median wall seconds of each process (passive waiting)")
    settings = [("demo-large", (allowed, allowed)), ("demo-large", (default[0], allowed)), ("demo-large", None),
                ("demo-small", (allowed, allowed)), ("demo-small", None)]
    for round_number in range(args.processes):  # settings interleaved, so that drifts hit them alike
        for model, threads in settings:
            result = run_probe(model, threads, args.repeats)
            named = result.pop("settings")
            label = "default " if threads is None else ""
            cells = "; ".join(f"{shape} {cpu:.3f} CPU-s / {wall:.3f} s" for shape, (cpu, wall) in result.items())
            report.say(f"  process {round_number + 1} {model} {label}{named}: {cells}")
    report.say(f"after: {uptime()}")
    if not args.no_save:
        path = report.append_to(RESULTS / "threads.txt", "bench/threads.py")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
