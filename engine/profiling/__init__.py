"""Profiling: run a model over a design of (input, output) token counts, measuring each trial.

``design`` builds the points, ``stopping`` decides when a point has enough trials,
``jobs`` keeps job state in the database and names the lifecycle every long run shares
(:mod:`engine.runs`: start, cancel, resume) for jobs, ``worker`` is the separate process
that runs the inference and hands every trial to a sink that stores it.
"""
