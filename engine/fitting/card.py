"""The energy model card: one (model, device, energy scope) as a self-contained JSON document.

It carries what a reader needs to trust or reuse the surfaces: model, device, the
sensor behind the energy and its scope, each target's form and coefficients with
units, metrics (CV MAPE, R², noise floor), the measured domain and points, software
versions and the measurement ids (as inclusive ranges). :func:`fits_from_card` gives
back the fits, so a downloaded card can predict exactly as the fits did.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.errors import InputError, Problem
from engine.fitting.result import UNCERTAINTY_MEANING, FitResult
from engine.formatting import json_safe

CARD_KIND = "joule-planner energy model card"
CARD_VERSION = 1


def energy_model_card(fits: Iterable[FitResult]) -> dict:
    """The card of the fits of one (model, device, energy scope): energy and/or runtime.

    Raises :class:`InputError` when the fits are empty or belong to different
    (model, device, energy scope) or repeat a target.
    """
    fits = list(fits)
    if not fits:
        raise InputError(Problem("fits", "none given", None, "the energy and runtime fits of one model on one device"))
    keys = {(f.model, f.device, f.energy_scope) for f in fits}
    if len(keys) > 1:
        raise InputError(Problem("fits", "belong to more than one (model, device, energy scope)", None,
                                 "the fits of one model on one device in one scope"))
    targets = [f.target for f in fits]
    if len(set(targets)) != len(targets):
        raise InputError(Problem("fits", "repeat a target", None, "at most one energy and one runtime fit"))
    first = next((f for f in fits if f.target == "energy"), fits[0])
    sensor = dict(first.details.get("sensor", {}))
    sensor.setdefault("energy_scope", first.energy_scope)
    sensor["energy_source"] = first.energy_source if first.target == "energy" else sensor.get("energy_source")
    sensor["energy_estimated"] = first.energy_estimated
    ordered = sorted(fits, key=lambda f: f.target)
    card = {
        "kind": CARD_KIND,
        "card_version": CARD_VERSION,
        "model": first.model,
        "device": first.device,
        "energy_scope": first.energy_scope,
        "source": first.source,
        "label": first.label,
        "sensor": sensor,
        "domain": first.domain,
        "uncertainty": UNCERTAINTY_MEANING,
        "targets": {
            f.target: {
                "form": f.form,
                "description": f.details.get("description", ""),
                "coefficients": {t: {"value": f.coefficients[t], "unit": u} for t, u in f.units.items()},
                "metrics": {"cv_mape": f.cv_mape, "r2": f.r2, "cv_r2": f.details.get("cv_r2"),
                            "noise_mape": f.details.get("noise_mape"), "noise_rel_sd": f.noise_rel_sd},
                "n_points": f.n_points,
                "n_trials": f.n_trials,
                "candidates": f.to_json_dict()["candidates"],
                "measurement_id_ranges": f.details.get("measurement_id_ranges", []),
            } for f in ordered
        },
        "software": first.details.get("software", {}),
        "fits": [f.to_dict() for f in ordered],
    }
    return json_safe(card)


def fits_from_card(card: dict) -> list[FitResult]:
    """The fits a card was made from (what a downloaded card predicts with)."""
    if not isinstance(card, dict) or card.get("kind") != CARD_KIND or "fits" not in card:
        raise InputError(Problem("card", "is not a Joule Planner energy model card", None,
                                 f"a JSON object with kind {CARD_KIND!r} and a list of fits"))
    try:
        return [FitResult.from_dict(f) for f in card["fits"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(Problem("card", f"has a fit that cannot be read ({exc})", None,
                                 "a card written by energy_model_card")) from None
