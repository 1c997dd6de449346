"""Why executed energy missed the plan: each candidate cause measured on the demo models.

    .venv/bin/python bench/fidelity_causes.py [--repeats 3] [--out bench/results/fidelity_causes.txt]

The energy on a host without sensors is the CPU estimate (CPU-seconds of the measured
processes × watts per CPU), so every figure here is in CPU-seconds (the estimate at
1 W per CPU) and wall seconds, read through the app's own meter (``open_meter("cpu")``).

Each configuration runs in a fresh process (OpenMP reads its wait policy once, when the
library loads), configurations interleaved in a seeded shuffled order, each repeated
``--repeats`` times; every run is printed, never only the best.

(a) waiting threads: OpenMP's default wait policy (threads spin for a while before they
    sleep) against ``OMP_WAIT_POLICY=PASSIVE``, and one thread (``torch.set_num_threads(1)``,
    llama.cpp ``n_threads=1``), each alone and beside two busy-loop processes. Both
    backends use OpenMP here (this llama-cpp-python build links libgomp: ggml's barrier
    is an OpenMP barrier, and its threadpool ``poll`` setting does not apply).
(b) cold first request after the load against the warm ones (same shape); and part ``b``:
    the same after the warm-up that profiling and execution now both do after a load
    (``engine.energy.load_cost``: 2 requests of 16 in, 8 out), against none.
(c) a text prompt (tokenise, answer, stop at the end or the cap, detokenise) against the
    synthetic request of the same token counts, run alternately.
(d) two "devices" in one process, each measuring its windows over the whole process (as
    execution did), against two processes each measuring itself: the sum of the devices'
    windows over what the process(es) used in the same span.
(e) the idle baseline: the estimate's idle power over a 2 s and a 5 s window.
(n) the neighbour test's protocol (tests/test_energy_estimate.py), longer: one worker process
    (passive waiting), measurements alternating between quiet and loaded (one busy loop per
    logical CPU started just before), each measurement 3 requests; the ratio of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # name: (backend, path, input tokens, output tokens)
    "demo-small": ("transformers", ROOT / "data/models/demo-small-hf", 64, 32),
    "demo-large": ("llama.cpp", ROOT / "data/models/demo-large.gguf", 32, 16),
}
POLICIES = ("default", "passive", "1 thread")
PROMPT = ("Explain briefly how a planner decides which model answers a request, and why the energy of "
          "a request depends on its prompt and answer lengths.")
WARM_REQUESTS = 3
D_TITLE = ("(d) two devices at once (demo-small and demo-large, 3 requests each, passive waiting): "
           "sum of the devices' windows / CPU-s the process(es) used in the same span")
N_TITLE = (f"(n) quiet / loaded pairs (passive waiting; loaded: {os.cpu_count()} busy loops), "
           "3 requests a measurement")


# -- the probe: one configuration, in its own process ---------------------------------------------

def _meter():
    """The app's CPU meter at 1 W per CPU, so its joules are CPU-seconds."""
    from engine.energy import open_meter
    from engine.energy.estimate import CpuPowerModel

    return open_meter("cpu", cpu_model=CpuPowerModel(1.0, "any", "1 W per CPU: joules are CPU-seconds"))


def _timed(meter, work):
    with meter.window() as window:
        out = work()
    return {"wall_s": window.result.duration_s, "cpu_s": window.result.energy_j}, out


def probe(config: dict) -> dict:
    """Load, a cold request, warm ones, text against synthetic, idle windows; CPU-s and wall of each."""
    from engine.backends import open_backend

    backend_name, path, n_in, n_out = MODELS[config["model"]]
    options = {}
    if config["policy"] == "1 thread":
        if backend_name == "transformers":
            import torch

            torch.set_num_threads(1)
        else:
            options["n_threads"] = 1
    meter = _meter()
    backend = open_backend(backend_name, path, "cpu", **options)
    out = {**config, "pid": os.getpid(), "load_avg_1m": os.getloadavg()[0]}
    out["load"], _ = _timed(meter, backend.load)
    out["threads"] = backend.settings.get("torch_threads", backend.settings.get("n_threads"))
    if config.get("warmup"):
        from engine.energy.load_cost import warm_up

        out["warmup_cost"], _ = _timed(meter, lambda: warm_up(backend, config["warmup"]))
    out["cold"], _ = _timed(meter, lambda: backend.generate(n_in, n_out))
    out["warm"] = [_timed(meter, lambda: backend.generate(n_in, n_out))[0] for _ in range(WARM_REQUESTS)]
    if config.get("text"):
        out["text"], out["synthetic"] = [], []
        for _ in range(WARM_REQUESTS):
            cost, answer = _timed(meter, lambda: backend.generate_text(PROMPT, n_out))
            out["text"].append({**cost, "input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens})
            cost, _ = _timed(meter, lambda: backend.generate(answer.input_tokens, max(answer.output_tokens, 1)))
            out["synthetic"].append(cost)
    if config.get("idle"):
        out["idle"] = {}
        for seconds in (2.0, 5.0):
            cost, _ = _timed(meter, lambda: time.sleep(seconds))
            out["idle"][f"{seconds:g}s"] = cost["cpu_s"] / cost["wall_s"]  # W at 1 W per CPU = busy CPUs
    backend.close()
    meter.close()
    return out


def attribution_probe(config: dict) -> dict:
    """(d): two backends busy at once, each with a meter over this whole process (execution's way before)."""
    from engine.backends import open_backend
    from engine.energy.cpu_time import ProcessTreeCpu

    meter_per_device = {name: _meter() for name in config["models"]}
    backends = {name: open_backend(MODELS[name][0], MODELS[name][1], "cpu") for name in config["models"]}
    for backend in backends.values():
        backend.load()
        backend.generate(8, 2)  # warm
    charged = {name: 0.0 for name in backends}
    process = ProcessTreeCpu()

    def device(name: str) -> None:
        _, _, n_in, n_out = MODELS[name]
        for _ in range(config["requests"]):
            cost, _ = _timed(meter_per_device[name], lambda: backends[name].generate(n_in, n_out))
            charged[name] += cost["cpu_s"]

    start = process.sample(opening=True).process_cpu_s
    threads = [threading.Thread(target=device, args=(name,)) for name in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    used = process.sample().process_cpu_s - start
    return {"layout": "threads of one process", "charged_cpu_s": charged, "process_cpu_s": used}


def attribution_processes(models: list[str], requests: int) -> dict:
    """(d), the other way: one process per device, each measuring itself; the parent reads their total."""
    from engine.energy.cpu_time import ProcessTreeCpu

    env = _env("passive")
    children = [subprocess.Popen([sys.executable, __file__, "--probe-device", json.dumps({"model": m, "requests": requests})],
                                 stdout=subprocess.PIPE, stdin=subprocess.PIPE, env=env, text=True)
                for m in models]
    for child in children:  # each says "ready" once loaded and warm
        assert child.stdout.readline().strip() == "ready"
    tree = ProcessTreeCpu([c.pid for c in children])
    start = tree.sample().process_cpu_s
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    results = [json.loads(child.stdout.readline()) for child in children]
    used = tree.sample().process_cpu_s - start  # read before they exit
    for child in children:
        child.stdin.close()
        child.wait()
    return {"layout": "one process per device", "charged_cpu_s": {r["model"]: r["cpu_s"] for r in results},
            "process_cpu_s": used}


def neighbour_probe(config: dict) -> None:
    """(n): a loaded model that measures ``requests`` requests per line read, printing their CPU-s."""
    from engine.backends import open_backend
    from engine.energy.load_cost import warm_up

    backend_name, path, n_in, n_out = MODELS[config["model"]]
    options = {}
    if config.get("threads") == 1:
        if backend_name == "transformers":
            import torch

            torch.set_num_threads(1)
        else:
            options["n_threads"] = 1
    meter = _meter()
    backend = open_backend(backend_name, path, "cpu", **options)
    backend.load()
    warm_up(backend)
    print("ready", flush=True)
    for _ in sys.stdin:
        cost, _ = _timed(meter, lambda: [backend.generate(n_in, n_out) for _ in range(config["requests"])])
        print(json.dumps(cost), flush=True)


def _part_n(models: list[str], pairs: int, say, raw: list[dict]) -> None:
    say("")
    say(N_TITLE)
    for model in models:
        for threads in (None, 1):
            worker = subprocess.Popen([sys.executable, __file__, "--probe-neighbour",
                                       json.dumps({"model": model, "threads": threads, "requests": 3})],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env("passive"))
            assert worker.stdout.readline().strip() == "ready"
            ratios, quiet_all, loaded_all = [], [], []
            for pair in range(pairs):
                costs = {}
                for loaded in ((False, True) if pair % 2 == 0 else (True, False)):
                    with Neighbours(os.cpu_count() if loaded else 0):
                        if loaded:
                            time.sleep(0.3)
                        worker.stdin.write("go\n")
                        worker.stdin.flush()
                        costs[loaded] = json.loads(worker.stdout.readline())["cpu_s"]
                ratios.append(costs[True] / costs[False])
                quiet_all.append(costs[False])
                loaded_all.append(costs[True])
            worker.stdin.close()
            worker.wait()
            result = {"part": "n", "model": model, "threads": threads or "default", "ratios": ratios,
                      "quiet_cpu_s": quiet_all, "loaded_cpu_s": loaded_all}
            raw.append(result)
            _report_n(result, say)


def _report_n(result: dict, say) -> None:
    say(f"  {result['model']:10} threads {result['threads']!s:7}: loaded/quiet median "
        f"{statistics.median(result['ratios']):.3f} (pairs {', '.join(f'{x:.2f}' for x in result['ratios'])}); "
        f"quiet {statistics.median(result['quiet_cpu_s']):.3f} CPU-s, loaded {statistics.median(result['loaded_cpu_s']):.3f}")


def device_probe(config: dict) -> None:
    from engine.backends import open_backend

    backend_name, path, n_in, n_out = MODELS[config["model"]]
    meter = _meter()
    backend = open_backend(backend_name, path, "cpu")
    backend.load()
    backend.generate(8, 2)
    print("ready", flush=True)
    sys.stdin.readline()
    total = 0.0
    for _ in range(config["requests"]):
        cost, _ = _timed(meter, lambda: backend.generate(n_in, n_out))
        total += cost["cpu_s"]
    print(json.dumps({"model": config["model"], "cpu_s": total}), flush=True)
    sys.stdin.readline()


# -- the driver ------------------------------------------------------------------------------------

def _env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run_probe(flag: str, config: dict, policy: str) -> dict:
    done = subprocess.run([sys.executable, __file__, flag, json.dumps(config)], env=_env(policy),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Neighbours:
    """Busy-loop processes beside the measurement (a CPU-heavy neighbour: the app, a browser)."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.wait()


def _range(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}" if len(values) > 1 else f"{values[0]:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="demo-small,demo-large")
    parser.add_argument("--neighbours", type=int, default=2, help="busy-loop processes in the loaded runs")
    parser.add_argument("--parts", default="a,b,n,d", help="a (also b's cold first request, c, e), b, n, d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the report (and the raw runs as JSON lines) here")
    parser.add_argument("--report", type=Path, help="print the report of the runs kept in this .jsonl file, run nothing")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-attribution", help=argparse.SUPPRESS)
    parser.add_argument("--probe-device", help=argparse.SUPPRESS)
    parser.add_argument("--probe-neighbour", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.probe_attribution:
        print(json.dumps(attribution_probe(json.loads(args.probe_attribution))))
        return 0
    if args.probe_device:
        device_probe(json.loads(args.probe_device))
        return 0
    if args.probe_neighbour:
        neighbour_probe(json.loads(args.probe_neighbour))
        return 0

    if args.report:
        kept = [json.loads(line) for line in args.report.read_text(encoding="utf-8").splitlines() if line.strip()]
        part_a = [r for r in kept if "part" not in r]
        if part_a:
            _report_a(part_a, print)
        if any(r.get("part") == "b" for r in kept):
            _report_b([r for r in kept if r.get("part") == "b"], print)
        if any(r.get("part") == "d" for r in kept):
            print("")
            print(D_TITLE)
        for r in (r for r in kept if r.get("part") == "d"):
            _report_d(r, print)
        if any(r.get("part") == "n" for r in kept):
            print("")
            print(N_TITLE)
        for r in (r for r in kept if r.get("part") == "n"):
            _report_n(r, print)
        return 0
    models = args.models.split(",")
    parts = set(args.parts.split(","))
    lines: list[str] = []
    raw: list[dict] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"bench/fidelity_causes.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} logical CPUs ({_cpu_name()}), load average at start {os.getloadavg()[0]:.1f}")
    rng = random.Random(args.seed)
    if "a" in parts:
        configs = [{"model": m, "policy": p, "neighbours": n} for m in models for p in POLICIES
                   for n in (0, args.neighbours)]
        runs: list[dict] = []
        for repeat in range(1, args.repeats + 1):
            order = configs[:]
            rng.shuffle(order)
            for config in order:
                probe_config = {**config, "repeat": repeat, "text": config["neighbours"] == 0,
                                "idle": config["neighbours"] == 0 and config["policy"] != "1 thread"}
                with Neighbours(config["neighbours"]):
                    result = _run_probe("--probe", probe_config, config["policy"])
                runs.append(result)
                raw.append(result)
                warm = result["warm"]
                print(f"  run {repeat} {config['model']} {config['policy']:8} neighbours={config['neighbours']}: "
                      f"warm CPU-s {_range([w['cpu_s'] for w in warm])}, wall {_range([w['wall_s'] for w in warm])}",
                      flush=True)
        _report_a(runs, say)
    if "b" in parts:
        _part_b(models, args.repeats, rng, say, raw)
    if "n" in parts:
        _part_n(models, 8, say, raw)
    if "d" in parts:
        say("")
        say(D_TITLE)
        for repeat in range(1, args.repeats + 1):
            for layout in ("threads", "processes"):
                if layout == "threads":
                    result = _run_probe("--probe-attribution", {"models": models, "requests": 3}, "passive")
                else:
                    result = attribution_processes(models, 3)
                raw.append({"part": "d", "repeat": repeat, **result})
                _report_d(raw[-1], say)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        args.out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in raw) + "\n", encoding="utf-8")
    return 0


def _report_d(result: dict, say) -> None:
    charged = sum(result["charged_cpu_s"].values())
    per = ", ".join(f"{m} {v:.2f}" for m, v in result["charged_cpu_s"].items())
    say(f"  run {result['repeat']}, {result['layout']:24}: devices charged {charged:.2f} CPU-s ({per}), "
        f"used {result['process_cpu_s']:.2f} CPU-s: ratio {charged / result['process_cpu_s']:.2f}")


def _part_b(models: list[str], repeats: int, rng: random.Random, say, raw: list[dict]) -> None:
    """The first request after a load, with and without the warm-up, over the median of the next ones."""
    configs = [{"model": m, "policy": "passive", "neighbours": 0, "warmup": w} for m in models for w in (0, 2)]
    runs = []
    for repeat in range(1, repeats + 1):
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            result = _run_probe("--probe", {**config, "repeat": repeat}, "passive")
            runs.append(result)
            raw.append({"part": "b", **result})
    _report_b(runs, say)


def _report_b(runs: list[dict], say) -> None:
    say("")
    say("(b) first request after the load / median of the next 3 (passive waiting, no neighbour), "
        "without and with the warm-up (2 x 16 in, 8 out)")
    for r in sorted(runs, key=lambda r: (r["model"], r["warmup"], r["repeat"])):
        warm_cpu = statistics.median(w["cpu_s"] for w in r["warm"])
        warm_wall = statistics.median(w["wall_s"] for w in r["warm"])
        extra = (f"; the warm-up itself {r['warmup_cost']['wall_s']:.2f} s, {r['warmup_cost']['cpu_s']:.3f} CPU-s"
                 if r.get("warmup") else "")
        say(f"  {r['model']:10} warm-up {'yes' if r.get('warmup') else 'no '} run {r['repeat']}: "
            f"CPU-s x{r['cold']['cpu_s'] / warm_cpu:.2f}, wall x{r['cold']['wall_s'] / warm_wall:.2f} "
            f"(load {r['load']['wall_s']:.2f} s, {r['load']['cpu_s']:.2f} CPU-s{extra})")


def _cpu_name() -> str:
    from engine.energy.estimate import cpu_model_name

    return cpu_model_name()


def _report_a(runs: list[dict], say) -> None:
    say("")
    say("(a) waiting threads: warm requests, CPU-s and wall s per request (every run: min–max of its "
        f"{WARM_REQUESTS} requests)")
    say("| model | policy | neighbours | threads | run | CPU-s | wall s | CPU-s / wall |")
    say("|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["model"], POLICIES.index(r["policy"]), r["neighbours"], r["repeat"])  # noqa: E731
    for r in sorted(runs, key=key):
        cpu = [w["cpu_s"] for w in r["warm"]]
        wall = [w["wall_s"] for w in r["warm"]]
        say(f"| {r['model']} | {r['policy']} | {r['neighbours']} | {r['threads']} | {r['repeat']} | {_range(cpu)} | "
            f"{_range(wall)} | {statistics.median(c / w for c, w in zip(cpu, wall)):.2f} |")
    say("")
    say("per request, median (min–max) over every warm request of the runs; loaded / alone: the estimate's "
        "drift under busy neighbours")
    for model in dict.fromkeys(r["model"] for r in runs):
        for policy in POLICIES:
            def pooled(loaded: bool, what: str) -> list[float]:
                return [w[what] for r in runs if r["model"] == model and r["policy"] == policy
                        and (r["neighbours"] > 0) == loaded for w in r["warm"]]
            alone, loaded = pooled(False, "cpu_s"), pooled(True, "cpu_s")
            if alone and loaded:
                say(f"  {model:10} {policy:8}: CPU-s alone {statistics.median(alone):.3f} ({_range(alone)}), "
                    f"loaded {statistics.median(loaded):.3f} ({_range(loaded)}): "
                    f"x{statistics.median(loaded) / statistics.median(alone):.2f}; wall s alone "
                    f"{statistics.median(pooled(False, 'wall_s')):.3f} ({_range(pooled(False, 'wall_s'))}), loaded "
                    f"{statistics.median(pooled(True, 'wall_s')):.3f} ({_range(pooled(True, 'wall_s'))})")
    say("")
    say("(b) cold first request after the load / median warm request of the same run (alone)")
    for r in sorted((r for r in runs if r["neighbours"] == 0), key=key):
        warm_cpu = statistics.median(w["cpu_s"] for w in r["warm"])
        warm_wall = statistics.median(w["wall_s"] for w in r["warm"])
        say(f"  {r['model']:10} {r['policy']:8} run {r['repeat']}: CPU-s x{r['cold']['cpu_s'] / warm_cpu:.2f}, "
            f"wall x{r['cold']['wall_s'] / warm_wall:.2f} (cold {r['cold']['cpu_s']:.3f} CPU-s; "
            f"load {r['load']['wall_s']:.2f} s, {r['load']['cpu_s']:.2f} CPU-s)")
    say("")
    say("(c) text prompt / synthetic request of the same token counts, run alternately (alone)")
    for model in dict.fromkeys(r["model"] for r in runs):
        for policy in POLICIES:
            ratios = [t["cpu_s"] / s["cpu_s"] for r in runs if r["model"] == model and r["policy"] == policy
                      and isinstance(r.get("text"), list) for t, s in zip(r["text"], r["synthetic"])]
            if ratios:
                say(f"  {model:10} {policy:8}: CPU-s ratio median {statistics.median(ratios):.3f} ({_range(ratios)})")
    for r in sorted((r for r in runs if r.get("text")), key=key):
        ratios = [t["cpu_s"] / s["cpu_s"] for t, s in zip(r["text"], r["synthetic"])]
        wall = [t["wall_s"] / s["wall_s"] for t, s in zip(r["text"], r["synthetic"])]
        shape = f"{r['text'][0]['input_tokens']} in, {r['text'][0]['output_tokens']} out"
        say(f"  {r['model']:10} {r['policy']:8} run {r['repeat']} ({shape}): CPU-s ratios "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; wall ratios {', '.join(f'{x:.2f}' for x in wall)}")
    say("")
    say("(e) the estimate's idle power (busy CPUs × watts per CPU; here in CPUs) with the model loaded")
    for r in sorted((r for r in runs if r.get("idle")), key=key):
        say(f"  {r['model']:10} {r['policy']:8} run {r['repeat']}: 2 s window {r['idle']['2s']:.4f}, "
            f"5 s window {r['idle']['5s']:.4f} busy CPUs")


if __name__ == "__main__":
    sys.exit(main())
