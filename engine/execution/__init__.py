"""Execution: run a plan on this host, measure what it really cost, close the loop.

Public API (the CLI's ``execute`` and the Execute page use only these):
:func:`create_execution`, :func:`import_schedule`, :func:`start_worker`,
:func:`cancel_execution`, :func:`resume_execution`, :func:`reconcile_executions`,
:func:`execution_progress`, :func:`execution_results`, :func:`compare`,
:func:`learned_output_lengths`, :func:`list_executions`, :func:`get_execution`,
:func:`execution_energy_scope`, :func:`why_plan_cannot_run_here`,
:func:`execution_batches` (each executed batch as measured, next to its prediction),
:func:`execution_band_check` (the measured total against the plan's energy band, in a sentence),
:func:`execution_energy_band`, :func:`with_batch_bands` and :func:`share_rule_sentence`.
"""

from engine.execution.jobs import (
    ACTIVE,
    FINISHED,
    Execution,
    ExecutionProgress,
    cancel_execution,
    create_execution,
    execution_energy_scope,
    execution_progress,
    execution_results,
    get_execution,
    import_schedule,
    list_executions,
    plan_queries,
    reconcile_executions,
    resume_execution,
    start_worker,
    why_plan_cannot_run_here,
    worker_log_path,
)
from engine.execution.band_check import (
    BandCheck,
    check_band,
    execution_band_check,
    execution_energy_band,
    share_rule_sentence,
    with_batch_bands,
)
from engine.execution.report import Comparison, compare, execution_batches, learned_output_lengths

__all__ = [
    "ACTIVE", "BandCheck", "Comparison", "Execution", "ExecutionProgress", "FINISHED", "cancel_execution",
    "check_band", "compare", "create_execution", "execution_band_check", "execution_batches",
    "execution_energy_band", "execution_energy_scope", "execution_progress", "execution_results", "get_execution",
    "import_schedule", "learned_output_lengths", "list_executions", "plan_queries", "reconcile_executions",
    "resume_execution", "share_rule_sentence", "start_worker", "why_plan_cannot_run_here", "with_batch_bands",
    "worker_log_path",
]
