"""Models: the catalog — view it, add a model, edit or remove one, import a catalog CSV."""

import streamlit as st

from engine import catalog
from engine.errors import PlannerError
from ui.surfaces import show_surfaces
from engine.formatting import format_accuracy, format_parameters
from ui.common import flash, get_store, show_error, show_flash
from ui.navigation import ensure_app_navigation

ensure_app_navigation()
st.title("Models")
store = get_store()
show_flash()

try:
    models = catalog.list_models(store)
except PlannerError as exc:
    show_error(exc)
    st.stop()

if models.empty:
    st.info("The catalog is empty. Add a model below, or run `make run`, which generates the demo models.")
else:
    shown = models.assign(
        accuracy=models.accuracy.map(format_accuracy),
        demo=models.is_demo.map(lambda d: "demo" if d else ""),
        parameters=models.params_b.map(format_parameters),
    )[["name", "backend", "accuracy", "accuracy_source", "parameters", "demo", "path", "notes"]]
    st.dataframe(shown, hide_index=True, width="stretch", column_config={"accuracy_source": "accuracy source"})
    if models.is_demo.any():
        st.caption("Demo models have random weights: real inference, meaningless text. "
                   "Their accuracy scores are illustrative, not benchmark results.")

add_tab, edit_tab, import_tab = st.tabs(["Add a model", "Edit or remove", "Import a catalog CSV"])

with add_tab:
    with st.form("add_model", clear_on_submit=False):
        name = st.text_input("Name", placeholder="llama-2-7b", key="add_name")
        kind = st.radio("Where the weights are", ["Local path", "Model hub id", "External (measurements only)"],
                        horizontal=True, key="add_kind",
                        help="Local path: a Hugging Face model directory or a .gguf file. External: no weights here; "
                             "plan with measurements imported from another host.")
        location = st.text_input("Path or hub id", placeholder="/models/llama-2-7b  or  meta-llama/Llama-2-7b-hf",
                                 key="add_location")
        accuracy = st.text_input("Accuracy", placeholder="0.645 or 64.5%",
                                 help="A fraction in [0, 1], or a percentage written with %.", key="add_accuracy")
        source = st.text_input("Accuracy source", placeholder="Open LLM Leaderboard average, 2024-06", key="add_source")
        params_b = st.text_input("Parameters (billions, optional)", placeholder="counted from the weights when empty",
                                 key="add_params")
        notes = st.text_input("Notes (optional)", key="add_notes")
        trust = st.checkbox("Allow this model's own code to run (trust_remote_code)", value=False,
                            help="Off by default: a model directory's Python code only runs if you allow it here.")
        if st.form_submit_button("Add model", type="primary"):
            path = None
            if kind == "Local path":
                path = location
            elif kind == "Model hub id":
                path = catalog.HUB_PREFIX + location.strip() if location.strip() else ""
            try:
                entry, warnings = catalog.add_model(
                    store, name=name, accuracy=accuracy, accuracy_source=source,
                    backend="external" if kind.startswith("External") else None,
                    path=path, params_b=params_b, notes=notes, trust_remote_code=trust, where="form")
            except PlannerError as exc:
                show_error(exc)
            else:
                flash(f"Added {entry.name} ({entry.backend}).", warnings)
                st.rerun()

with edit_tab:
    if models.empty:
        st.info("No model to edit yet.")
    else:
        chosen = st.selectbox("Model", models.name.tolist(), key="edit_model")
        current = catalog.get_model(store, chosen)
        with st.form("edit_model_form"):
            accuracy = st.text_input("Accuracy", value=f"{current.accuracy:g}" if current.accuracy is not None else "")
            source = st.text_input("Accuracy source", value=current.accuracy_source or "")
            params_b = st.text_input("Parameters (billions)", value=f"{current.params_b:g}" if current.params_b else "")
            notes = st.text_input("Notes", value=current.notes or "")
            if st.form_submit_button("Save changes", type="primary"):
                try:
                    catalog.update_model(store, chosen, accuracy=accuracy, accuracy_source=source,
                                         params_b=params_b, notes=notes)
                except PlannerError as exc:
                    show_error(exc)
                else:
                    flash(f"Saved {chosen}.")
                    st.rerun()
        st.divider()
        confirm = st.checkbox(f"Yes, remove {chosen} from the catalog (its measurements are kept)", key="confirm_remove")
        if st.button("Remove model", disabled=not confirm):
            try:
                kept = catalog.remove_model(store, chosen)
            except PlannerError as exc:
                show_error(exc)
            else:
                flash(f"Removed {chosen}." + (f" Its {kept} measurements stay in the database." if kept else ""))
                st.rerun()

with import_tab:
    st.markdown("Columns: `model, accuracy[, backend, path, params_b, notes]`. Accuracy is a fraction "
                "in [0, 1] or a percentage with `%`. The whole file is added, or nothing when any row is wrong.")
    upload = st.file_uploader("Catalog CSV", type=["csv"], key="catalog_upload")
    if upload is not None and st.button("Import", type="primary"):
        try:
            report = catalog.import_catalog_bytes(store, upload.getvalue(), upload.name)
        except PlannerError as exc:
            show_error(exc)
        else:
            flash(f"Added {len(report.added)} models: {', '.join(report.added)}.", report.warnings)
            st.rerun()

st.divider()
show_surfaces(store)
