"""What the Streamlit pages share, kept out of ``pages/`` (which holds only pages).

- :mod:`ui.common`: the store handle, errors and flashed messages shown the same way.
- :mod:`ui.navigation`: every page runs through app.py's navigation (one private switch).
- :mod:`ui.background`: long work (a plan, curves, fits) off the script thread, polled
  by a fragment, with progress.
- :mod:`ui.surfaces`, :mod:`ui.plan_view`: the larger drawings of the Models and Plan pages.

Everything here only draws and calls :mod:`engine`; the logic lives there.
"""
