"""Profiling: run a model over a design of (input, output) token counts, measuring each trial.

``design`` builds the points, ``stopping`` decides when a point has enough trials,
``jobs`` keeps job state in the database and starts, cancels and resumes workers,
``worker`` is the separate process that runs the inference and stores every trial.
"""
