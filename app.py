"""Joule Planner: the Streamlit entry point. Navigation only; each page lives in pages/."""

import streamlit as st

from ui.common import PAGE_ICON

# The icon is a file shipped with the app: a ":material/...:" page icon makes the browser
# fetch it from fonts.gstatic.com, which an offline host cannot reach.
st.set_page_config(page_title="Joule Planner", page_icon=str(PAGE_ICON), layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/models.py", title="Models", icon=":material/model_training:"),
    st.Page("pages/profile.py", title="Profile", icon=":material/speed:"),
    st.Page("pages/plan.py", title="Plan", icon=":material/route:"),
    st.Page("pages/execute.py", title="Execute", icon=":material/play_circle:"),
]

st.navigation(PAGES).run()
