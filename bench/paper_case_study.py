"""The paper's offline case study (its Fig. 5.4), redone with its published coefficients.

    .venv/bin/python bench/paper_case_study.py [--out docs] [--n 200] [--seed 0] [--steps 11]

Wilkins et al. schedule 200 Alpaca queries over Llama-2 7B / 13B / 70B, minimising
ζ·(normalised energy) − (1 − ζ)·(normalised token accuracy credit A_K·(τin + τout)) for ζ
swept from 0 to 1, and compare the schedules with each single model, round-robin and
random routing: total energy, mean runtime per query and accuracy against ζ.

Here:

- Energy and runtime: the paper's published coefficients (thesis Table 5.2, A100 40GB on
  Swing, KV cache off) from :func:`engine.fitting.published_fits`, device "a100-swing";
  accuracy A_K: thesis Table 4.1 (Open LLM Leaderboard averages). Nothing is measured here.
- Queries: ``--n`` (default 200) drawn with ``--seed`` from a *parametric stand-in* for the
  Alpaca dataset, which is not available here. τin and τout are independent lognormals,
  rounded and clipped to the paper's profiled range [8, 2048]:

      τin  ~ round(LogNormal(median 24 tokens, σ = 0.9))   # instruction (+ optional input)
      τout ~ round(LogNormal(median 60 tokens, σ = 1.0))   # the response

  Rationale: Alpaca prompts are mostly one-sentence instructions, some with a short input
  passage (a few to ~100 tokens; σ = 0.9 puts the central 90% at about 5-106 tokens before
  clipping); responses run from one word to a few paragraphs (σ = 1.0: about 12-310 tokens).
  These are judgement calls meant to resemble Alpaca's token-length statistics, not a fit
  to the dataset; they are the same as in bench/schedule_scale.py.
- Every coefficient of query i is built from its own (τin, τout); the paper's published
  routing script built them from sums over all queries.
- The paper's form predicts negative energy/runtime for long inputs with short outputs;
  the engine clamps those to 0 and says so (the warning is printed).

Printed: the workload's statistics; per ζ the total energy (J, kWh), mean predicted
runtime per query, token-weighted accuracy, queries per model, solver status and gap;
the baselines on the same predictions; and the energy-optimal schedule at round-robin's
token-weighted accuracy, with its saving against round-robin. Written under ``--out``:
paper_case_study.png (the three panels, rendered by headless Chromium through Playwright;
skipped with a message when Chromium is missing) and paper_case_study.csv (the sweep and
the baselines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.catalog import CatalogEntry  # noqa: E402
from engine.fitting import published_catalog_rows, published_fits  # noqa: E402
from engine.planning import Baseline, PlanSettings, make_plan, options_from_fits, predict_options  # noqa: E402
from engine.planning.plan import allowed_options, accuracy_weights, objective_costs  # noqa: E402

MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
DISPLAY = {"llama-2-7b": "Llama-2 7B", "llama-2-13b": "Llama-2 13B", "llama-2-70b": "Llama-2 70B"}
DEVICE = "a100-swing"
TOKENS_IN_MEDIAN, TOKENS_IN_SIGMA = 24, 0.9
TOKENS_OUT_MEDIAN, TOKENS_OUT_SIGMA = 60, 1.0
TOKEN_RANGE = (8, 2048)
J_PER_KWH = 3.6e6
CHROMIUM = Path("/usr/bin/chromium")
FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX = 1500, 560


def llama_options():
    """The three Llama-2 options on the published device, with the paper's accuracies."""
    fits = [fit for fit in published_fits() if fit.model in MODELS]
    catalog = {row["name"]: CatalogEntry(name=row["name"], backend="external", accuracy=row["accuracy"],
                                         accuracy_source=row["accuracy_source"])
               for row in published_catalog_rows() if row["name"] in MODELS}
    options, notes = options_from_fits(fits, catalog, "total")
    return options, notes


def draw_queries(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(τin, τout) of ``n`` queries from the documented lognormal stand-in for Alpaca."""
    rng = np.random.default_rng(seed)
    low, high = TOKEN_RANGE
    tokens_in = np.clip(np.round(rng.lognormal(np.log(TOKENS_IN_MEDIAN), TOKENS_IN_SIGMA, n)), low, high)
    tokens_out = np.clip(np.round(rng.lognormal(np.log(TOKENS_OUT_MEDIAN), TOKENS_OUT_SIGMA, n)), low, high)
    return tokens_in.astype(np.int64), tokens_out.astype(np.int64)


def describe(name: str, values: np.ndarray) -> str:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return (f"{name:5} min {values.min():5d}  p5 {q[0]:6.0f}  p25 {q[1]:6.0f}  median {q[2]:6.0f}  p75 {q[3]:6.0f}  "
            f"p95 {q[4]:6.0f}  max {values.max():5d}  mean {values.mean():7.1f}")


def sweep(predictions, zetas: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """One ζ-objective plan per ζ; returns the rows and the baselines (the same for every ζ)."""
    n = len(predictions.output_tokens)
    rows, baselines = [], None
    for zeta in zetas:
        settings = PlanSettings(objective="zeta", zeta=float(zeta), accuracy_mode="token")
        result = make_plan(predictions, settings, explain=False, compare=True)
        if not result.has_schedule:
            raise RuntimeError(f"ζ = {zeta:.2f}: no schedule ({result.status}): {'; '.join(result.diagnosis)}")
        schedule = result.schedule
        # Beside the solver: energy recomputed from the schedule itself.
        assert abs(schedule["predicted_energy_j"].sum() - result.energy_j) <= 1e-6 * max(result.energy_j, 1.0)
        # With no coupling rows each query's best option is independent: the optimum is the
        # row-wise minimum of the ζ-costs over the options it may use (a clamped, negative
        # prediction is not offered), so the solver's objective must equal it.
        offered = allowed_options(predictions, None)
        independent = float(np.where(offered, objective_costs(predictions, settings), np.inf).min(axis=1).sum())
        assert abs(result.objective_value - independent) <= 1e-9 * max(abs(independent), 1.0), (zeta, independent)
        counts = schedule["model"].value_counts()
        rows.append({"zeta": float(zeta), "energy_j": result.energy_j, "energy_kwh": result.energy_j / J_PER_KWH,
                     "mean_runtime_s": float(schedule["predicted_runtime_s"].mean()), "accuracy": result.accuracy,
                     **{f"n_{m}": int(counts.get(m, 0)) for m in MODELS},
                     "status": result.status, "gap": result.gap})
        if baselines is None:
            baselines = result.baselines
        else:  # baselines do not depend on ζ; check rather than assume
            for name, values in result.baselines.items():
                assert values.energy_j == baselines[name].energy_j, name
    frame = pd.DataFrame(rows)
    assert all(sum(row[f"n_{m}"] for m in MODELS) == n for row in rows)
    return frame, baselines


def baseline_rows(baselines: dict[str, Baseline], n: int) -> pd.DataFrame:
    """Energy, mean runtime and accuracy of each baseline. All options share one device, so
    the device's total runtime (makespan) over n is the mean runtime per query."""
    rows = []
    for name, values in baselines.items():
        runtime_total = sum(values.per_device_runtime_s.values())
        assert abs(runtime_total - values.makespan_s) <= 1e-9 * max(runtime_total, 1.0)
        rows.append({"baseline": name.replace(f"@{DEVICE}", ""), "energy_j": values.energy_j,
                     "energy_kwh": values.energy_j / J_PER_KWH, "mean_runtime_s": runtime_total / n,
                     "accuracy": values.accuracy})
    return pd.DataFrame(rows)


def print_sweep(frame: pd.DataFrame) -> None:
    header = (f"{'ζ':>4} {'energy_J':>12} {'energy_kWh':>10} {'mean_runtime_s':>14} {'accuracy':>8} "
              + " ".join(f"{DISPLAY[m]:>11}" for m in MODELS) + f" {'status':>8} {'gap':>9}")
    print(header)
    for r in frame.to_dict("records"):
        print(f"{r['zeta']:4.1f} {r['energy_j']:12,.0f} {r['energy_kwh']:10.4f} {r['mean_runtime_s']:14.2f} "
              f"{r['accuracy']:8.4f} " + " ".join(f"{r[f'n_{m}']:>11d}" for m in MODELS)
              + f" {r['status']:>8} {r['gap']:9.2e}")


def print_baselines(frame: pd.DataFrame) -> None:
    print(f"{'baseline':24} {'energy_J':>12} {'energy_kWh':>10} {'mean_runtime_s':>14} {'accuracy':>8}")
    for row in frame.itertuples(index=False):
        print(f"{row.baseline:24} {row.energy_j:12,.0f} {row.energy_kwh:10.4f} {row.mean_runtime_s:14.2f} "
              f"{row.accuracy:8.4f}")


def at_round_robin_accuracy(predictions, round_robin: Baseline, n: int) -> dict:
    """The energy-optimal schedule whose token-weighted accuracy is at least round-robin's."""
    settings = PlanSettings(objective="energy", accuracy_target=float(round_robin.accuracy),
                            accuracy_mode="token")
    result = make_plan(predictions, settings, explain=False, compare=False)
    if not result.has_schedule:
        raise RuntimeError(f"no schedule at round-robin's accuracy ({result.status}): {'; '.join(result.diagnosis)}")
    counts = result.schedule["model"].value_counts()
    return {"result": result, "energy_j": result.energy_j, "accuracy": result.accuracy,
            "mean_runtime_s": float(result.schedule["predicted_runtime_s"].mean()),
            "counts": {m: int(counts.get(m, 0)) for m in MODELS},
            "saved_j": round_robin.energy_j - result.energy_j,
            "saved_fraction": 1 - result.energy_j / round_robin.energy_j}


def plain_mip_energy(predictions, accuracy_target: float, time_limit_s: float = 30.0) -> tuple[str, float]:
    """Independent check: one binary per (query, option), the token-weighted accuracy row, CBC."""
    import mip

    n, k = predictions.energy_j.shape
    weights = accuracy_weights(predictions, "token")
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.threads = 1
    x = [[model.add_var(var_type=mip.BINARY) for _ in range(k)] for _ in range(n)]
    model.objective = mip.xsum(float(predictions.energy_j[i, j]) * x[i][j] for i in range(n) for j in range(k))
    for i in range(n):
        model += mip.xsum(x[i]) == 1
    model += mip.xsum(float((predictions.accuracy[j] - accuracy_target) * weights[i, j]) * x[i][j]
                      for i in range(n) for j in range(k)) >= 0
    status = model.optimize(max_seconds=time_limit_s)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return status.name.lower(), float("nan")
    return status.name.lower(), float(model.objective_value)


# -- the figure --------------------------------------------------------------------------

def build_figure(frame: pd.DataFrame, base: pd.DataFrame, n: int):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    panels = (("energy_j", "Total energy", "energy (MJ)", 1e-6),
              ("mean_runtime_s", "Mean runtime per query", "runtime per query (s)", 1.0),
              ("accuracy", "Accuracy (token-weighted A<sub>K</sub>)", "accuracy (%)", 100.0))
    figure = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title, _, _ in panels],
                           horizontal_spacing=0.07)
    styles = {"only llama-2-7b": ("Llama-2 7B only", "#2ca02c", "dash"),
              "only llama-2-13b": ("Llama-2 13B only", "#ff7f0e", "dash"),
              "only llama-2-70b": ("Llama-2 70B only", "#d62728", "dash"),
              "round-robin": ("round-robin", "#7f7f7f", "dot"),
              "random": ("random (seed 0)", "#9467bd", "dashdot")}
    for col, (column, _, axis, scale) in enumerate(panels, start=1):
        figure.add_trace(go.Scatter(x=frame["zeta"], y=frame[column] * scale, mode="lines+markers",
                                    name="optimal schedule (ζ)", legendgroup="optimal", showlegend=col == 1,
                                    line={"color": "#1f77b4", "width": 3}, marker={"size": 8}), row=1, col=col)
        for name, (label, color, dash) in styles.items():
            value = float(base.loc[base["baseline"] == name, column].iloc[0]) * scale
            figure.add_trace(go.Scatter(x=[0, 1], y=[value, value], mode="lines", name=label, legendgroup=name,
                                        showlegend=col == 1, line={"color": color, "dash": dash, "width": 2}),
                             row=1, col=col)
        figure.update_xaxes(title_text="ζ (weight on energy; 1 − ζ on accuracy)", range=[-0.03, 1.03], dtick=0.1,
                            row=1, col=col)
        figure.update_yaxes(title_text=axis, rangemode="tozero" if column != "accuracy" else "normal",
                            row=1, col=col)
    figure.update_layout(
        title={"text": f"Offline schedule of {n} queries on Llama-2 7B/13B/70B (paper's published A100 coefficients, "
                       "KV cache off; synthetic Alpaca-like token lengths)", "x": 0.5, "font": {"size": 16}},
        width=FIGURE_WIDTH_PX, height=FIGURE_HEIGHT_PX, template="plotly_white",
        legend={"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.2},
        margin={"l": 70, "r": 30, "t": 90, "b": 140})
    return figure


def write_png(figure, path: Path) -> bool:
    """Render the figure's HTML in headless Chromium and screenshot the plot. False when skipped."""
    if not CHROMIUM.exists():
        print(f"\nChromium is not at {CHROMIUM}: the figure was not written (install the chromium package to get it).")
        return False
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("\nPlaywright is not installed in this environment: the figure was not written.")
        return False
    html = figure.to_html(include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": FIGURE_WIDTH_PX + 40, "height": FIGURE_HEIGHT_PX + 40},
                                    device_scale_factor=1)
            page.set_content(html, wait_until="load")
            page.wait_for_selector(".plotly-graph-div .main-svg", state="attached", timeout=30_000)
            page.wait_for_function("() => document.querySelectorAll('.plotly-graph-div .scatterlayer .trace')"
                                   ".length > 0", timeout=30_000)
            page.locator(".plotly-graph-div").first.screenshot(path=str(path))
        finally:
            browser.close()
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for paper_case_study.png and .csv (default docs)")
    parser.add_argument("--n", type=int, default=200, help="number of queries (default 200, as in the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query draw (default 0)")
    parser.add_argument("--steps", type=int, default=11, help="ζ values from 0 to 1 (default 11: 0, 0.1, ..., 1)")
    args = parser.parse_args()
    started = time.perf_counter()

    options, notes = llama_options()
    for note in notes:
        print(f"note: {note}")
    print(f"options: {', '.join(o.key for o in options)}")
    print("accuracy A_K: " + ", ".join(f"{DISPLAY[o.model]} {o.accuracy:.4f}" for o in options))

    tokens_in, tokens_out = draw_queries(args.n, args.seed)
    print(f"\n{args.n} queries, seed {args.seed}: τin ~ LogNormal(median {TOKENS_IN_MEDIAN}, σ {TOKENS_IN_SIGMA}), "
          f"τout ~ LogNormal(median {TOKENS_OUT_MEDIAN}, σ {TOKENS_OUT_SIGMA}), rounded, clipped to {TOKEN_RANGE} "
          "(a stand-in for Alpaca, not the dataset)")
    print(describe("τin", tokens_in))
    print(describe("τout", tokens_out))

    predictions = predict_options(options, {o.model: tokens_in for o in options}, tokens_out)
    for warning in predictions.warnings:
        print(f"warning: {warning}")
    clamped = predictions.clamped
    print("clamped to 0 per model: " + ", ".join(f"{DISPLAY[o.model]} {int(clamped[:, k].sum())}"
                                                 for k, o in enumerate(predictions.options))
          + f"; queries clamped on every model: {int(clamped.all(axis=1).sum())}")

    zetas = np.linspace(0.0, 1.0, args.steps)
    frame, baselines = sweep(predictions, zetas)
    base = baseline_rows(baselines, args.n)
    print(f"\nζ sweep: min Σ ζ·ê − (1 − ζ)·â over {args.n} queries (ê, â normalised by their largest value; "
          "accuracy column token-weighted)")
    print_sweep(frame)
    print("\nbaselines on the same predictions")
    print_baselines(base)

    rr = baselines["round-robin"]
    best = at_round_robin_accuracy(predictions, rr, args.n)
    res = best["result"]
    print(f"\nat round-robin's token-weighted accuracy ({rr.accuracy:.4f}), the energy-optimal schedule "
          f"(status {res.status}, gap {res.gap:.1e}):")
    print(f"  energy     {best['energy_j']:12,.0f} J ({best['energy_j'] / J_PER_KWH:.4f} kWh) vs round-robin "
          f"{rr.energy_j:12,.0f} J ({rr.energy_j / J_PER_KWH:.4f} kWh)")
    print(f"  saves      {best['saved_j']:12,.0f} J ({best['saved_j'] / J_PER_KWH:.4f} kWh), "
          f"{100 * best['saved_fraction']:.1f}% of round-robin's energy")
    print(f"  accuracy   {best['accuracy']:.4f}; mean runtime per query {best['mean_runtime_s']:.2f} s "
          f"(round-robin {rr.makespan_s / args.n:.2f} s)")
    print("  queries    " + ", ".join(f"{DISPLAY[m]} {c}" for m, c in best["counts"].items()))
    status, plain = plain_mip_energy(predictions, float(rr.accuracy))
    print(f"  check      plain CBC model ({args.n * len(options)} binaries, one accuracy row): {status}, "
          f"{plain:,.1f} J (planner {best['energy_j']:,.1f} J; difference {best['energy_j'] - plain:+.1f} J)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([frame.assign(kind="zeta_sweep"), base.assign(kind="baseline")], ignore_index=True)
    table = table[["kind", "baseline"] + [c for c in table.columns if c not in ("kind", "baseline")]]
    table.to_csv(out / "paper_case_study.csv", index=False, float_format="%.10g")
    print(f"\nwrote {out / 'paper_case_study.csv'}")
    figure = build_figure(frame, base, args.n)
    if write_png(figure, out / "paper_case_study.png"):
        print(f"wrote {out / 'paper_case_study.png'}")
    print(f"total run time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
