"""Reference profiles: the paper's published A100 coefficients (Table 5.2), as fits.

Wilkins, Keshav, Mortier, arXiv 2407.04014 (2024), thesis Tables 4.1, 5.2 and 5.3:
seven LLMs on Swing (2x AMD EPYC 7742 + 8x A100 40GB), KV cache off, fitted by OLS with
no intercept: e = α0·τin + α1·τout + α2·τin·τout (J), r = β0·τin + β1·τout + β2·τin·τout (s).

They are labelled "published coefficients, no measurements": no trials exist here, so
they carry no cross-validated error, no uncertainty and no measurement ids; R² is the
paper's. Their α0, β0 are negative, so they predict negative energy and runtime for
long inputs with short outputs; :func:`engine.fitting.predict` returns the raw value,
a value clamped at 0 and a ``clamped`` flag, so that region stays visible.

**Mistral 7B β2.** The table prints β2 = 8.10e-2, the same as β1: a typo (it would make
the interaction cost as much as a whole output token per input token). We use
β2 = β1·α2/α1 = 9.02e-5 s/token²: for five of the six other models the runtime ratio
β2/β1 is within 7% of the energy ratio α2/α1 (Mixtral is the exception), so the model's
own energy ratio is the best available estimate. The fit's details record the printed
value, the one used and why (``details["corrections"]``).
"""

from __future__ import annotations

from engine.fitting.forms import PaperForm
from engine.fitting.result import FitResult
from engine.store import Store

PUBLISHED_DEVICE = "a100-swing"
PUBLISHED_LABEL = "published coefficients, no measurements"
PUBLISHED_CITATION = ("Wilkins, Keshav, Mortier, Offline Energy-Optimal LLM Serving: Workload-Based Energy Models "
                      "for LLM Inference on Heterogeneous Systems, arXiv 2407.04014 (2024); thesis Tables 4.1, 5.2, 5.3")
PUBLISHED_DOMAIN = {"input_tokens": [8, 2048], "output_tokens": [8, 2048]}
PUBLISHED_SENSOR = {
    "energy_scope": "total",
    "energy_source": "measured",
    "system": "Swing: 2x AMD EPYC 7742 + 8x NVIDIA A100 40GB",
    "energy_methods": ["as published: NVML energy counter (PyJoules) for the A100s, AMD uProf for the CPU cores"],
    "note": "measured by the paper's authors with the KV cache off; not re-measured here",
}

# name, α0, α1, α2, β0, β1, β2 (as printed), R² energy, R² runtime, A_K %, disk GB, min A100s, params (billions)
_TABLE = (
    ("falcon-7b", -8.81, 41.28, 8.91e-2, -2.45e-2, 1.07e-1, 2.42e-4, 0.964, 0.962, 44.17, 14.48, 1, 7.0),
    ("falcon-40b", -20.76, 197.37, 2.35e-1, -3.61e-2, 3.62e-1, 4.02e-4, 0.972, 0.976, 58.07, 83.66, 3, 40.0),
    ("llama-2-7b", -3.89, 31.52, 4.27e-2, -1.00e-2, 8.35e-2, 1.07e-4, 0.973, 0.972, 50.97, 13.48, 1, 7.0),
    ("llama-2-13b", -6.79, 56.01, 7.29e-2, -1.74e-2, 1.43e-1, 1.85e-4, 0.972, 0.972, 55.69, 26.03, 1, 13.0),
    ("llama-2-70b", -12.03, 414.82, 3.15e-1, -3.12e-2, 7.03e-1, 5.33e-4, 0.976, 0.980, 64.52, 137.98, 4, 70.0),
    ("mistral-7b", -3.12, 31.69, 3.53e-2, -7.80e-3, 8.10e-2, 8.10e-2, 0.975, 0.976, 60.97, 15.0, 1, 7.3),
    ("mixtral-8x7b", -8.48, 105.54, 9.86e-2, -1.34e-2, 2.96e-1, 1.50e-4, 0.980, 0.992, 68.47, 93.37, 3, 46.7),
)
_DISPLAY = {"falcon-7b": "Falcon 7B", "falcon-40b": "Falcon 40B", "llama-2-7b": "Llama-2 7B",
            "llama-2-13b": "Llama-2 13B", "llama-2-70b": "Llama-2 70B", "mistral-7b": "Mistral 7B",
            "mixtral-8x7b": "Mixtral 8x7B"}
PUBLISHED_MODELS = tuple(row[0] for row in _TABLE)


def _corrected_beta2(name: str, a1: float, a2: float, b1: float, b2: float) -> tuple[float, dict | None]:
    if name != "mistral-7b":
        return b2, None
    used = b1 * a2 / a1
    return used, {"coefficient": "input_x_output (β2, runtime)", "printed": b2, "used": used,
                  "why": "the printed β2 equals β1 (a typo in Table 5.2); β1·α2/α1 used instead, since β2/β1 tracks "
                         "α2/α1 within 7% for five of the six other models"}


def published_fits() -> list[FitResult]:
    """The 14 published fits (energy and runtime of seven models), source='published'."""
    terms = PaperForm.terms
    fits = []
    for name, a0, a1, a2, b0, b1, b2, r2_e, r2_r, accuracy, disk_gb, min_gpus, params_b in _TABLE:
        b2_used, correction = _corrected_beta2(name, a1, a2, b1, b2)
        for target, coefs, r2 in (("energy", (a0, a1, a2), r2_e), ("runtime", (b0, b1, b2_used), r2_r)):
            details = {
                "label": PUBLISHED_LABEL, "citation": PUBLISHED_CITATION, "display_name": _DISPLAY[name],
                "description": PaperForm.description, "weighting": "none (OLS, as published)",
                "sensor": dict(PUBLISHED_SENSOR), "published_grid": "powers of two 8..2048 on both axes",
                "accuracy": accuracy / 100.0, "disk_gb": disk_gb, "min_a100s": min_gpus,
                "warnings": ["published coefficients, no measurements: no cross-validated error or uncertainty",
                             "negative α0/β0: negative predictions for long inputs with short outputs"],
                "corrections": [correction] if (correction and target == "runtime") else [],
            }
            fits.append(FitResult(
                model=name, device=PUBLISHED_DEVICE, energy_scope="total", target=target, form=PaperForm.name,
                terms=tuple(terms), coefficients=dict(zip(terms, map(float, coefs))), r2=r2, cv_mape=None,
                n_points=0, n_trials=0, domain={k: list(v) for k, v in PUBLISHED_DOMAIN.items()}, source="published",
                energy_source="measured" if target == "energy" else None, candidates=[], coef_cov=None,
                noise_rel_sd=None, details=details))
    return fits


def published_catalog_rows() -> list[dict]:
    """Catalog rows for the seven published models, as external models.

    Keys match :func:`engine.catalog.build_entry`: name, accuracy (a fraction: A_K of
    thesis Table 4.1, the Open LLM Leaderboard average), accuracy_source, backend
    ('external': no local weights), params_b, notes.
    """
    return [{"name": name, "accuracy": round(accuracy / 100.0, 4),
             "accuracy_source": "Open LLM Leaderboard average, as published (Wilkins et al., thesis Table 4.1)",
             "backend": "external", "params_b": params_b,
             "notes": (f"{_DISPLAY[name]}: {disk_gb} GB on disk, at least {min_gpus} A100 40GB; energy/runtime from "
                       f"{PUBLISHED_LABEL} on device {PUBLISHED_DEVICE}")}
            for name, *_, accuracy, disk_gb, min_gpus, params_b in _TABLE]


def store_published_fits(store: Store) -> list[FitResult]:
    """Store the published fits unless the same coefficients are already the latest stored.

    Idempotent: returns the stored fits (with ids) either way, in one transaction.
    """
    from engine.fitting.storage import load_latest_fits, save_fits

    current = {(f.model, f.target): f for f in load_latest_fits(store, device=PUBLISHED_DEVICE, source="published")}
    wanted = published_fits()
    if all((f.model, f.target) in current and current[(f.model, f.target)].coefficients == f.coefficients
           for f in wanted):
        return [current[(f.model, f.target)] for f in wanted]
    return save_fits(store, wanted)


def load_reference_profiles(store: Store) -> list[str]:
    """Store the published fits and add their models to the catalog as external models.

    Models already in the catalog are left as they are. Returns the names added.
    """
    from engine import catalog

    store_published_fits(store)
    present = set(catalog.list_models(store).name)
    entries = [catalog.build_entry(**row)[0] for row in published_catalog_rows() if row["name"] not in present]
    if entries:
        catalog.add_models(store, entries)
    return [entry.name for entry in entries]
