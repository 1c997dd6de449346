"""Planning: workloads, the energy-optimal schedule (python-mip), baselines and stored plans.

Public API (the CLI's ``plan`` and the Plan page use only these):

- workloads: :func:`read_workload`, :func:`read_workload_upload`, :func:`parse_workload`,
  :func:`workload_from_frame`, :func:`planning_tokens`, :func:`store_workload`,
  :func:`load_workload`, :func:`list_workloads`
- options and predictions: :func:`load_options`, :func:`options_from_fits`, :func:`predict_options`
  (an option is a model on a device at a batch size)
- the plan: :class:`PlanSettings`, :func:`make_plan`, :func:`plan_workload`,
  :func:`pareto_curve`, :func:`baselines`, :func:`evaluate`; its typed parts
  :class:`PlanResult`, :class:`Baseline`, :class:`ConstraintCost`
- batches: :func:`form_batches` and :class:`Batches` (how the queries of an option are
  run together, and predicted from their real members)
- stored plans: :func:`store_plan`, :func:`list_plans`, :func:`load_plan`,
  :func:`schedule_csv`, :func:`write_schedule`
- the solver: :func:`solve`, :class:`AssignmentProblem`, :class:`CouplingRow`
"""

from engine.planning.batches import Batches, form_batches
from engine.planning.options import PlanOption, Predictions, load_options, options_from_fits, predict_options
from engine.planning.plan import (
    BEST_SINGLE_BATCHED,
    SAME_PLAN_AT_BATCH_ONE,
    Baseline,
    ConstraintCost,
    PlanResult,
    PlanSettings,
    allowed_options,
    baselines,
    evaluate,
    make_plan,
    pareto_curve,
)
from engine.planning.service import (
    BATCH_COLUMNS,
    SCHEDULE_COLUMNS,
    choose_options,
    list_plans,
    load_plan,
    plan_workload,
    schedule_csv,
    store_plan,
    write_schedule,
)
from engine.planning.solver import AssignmentProblem, CouplingRow, Solution, check_assignment, solve
from engine.planning.workload import (
    Workload,
    list_workloads,
    load_workload,
    parse_workload,
    planning_tokens,
    read_workload,
    read_workload_upload,
    store_workload,
    workload_from_frame,
)

__all__ = [
    "BATCH_COLUMNS", "BEST_SINGLE_BATCHED", "SAME_PLAN_AT_BATCH_ONE", "Batches", "form_batches",
    "AssignmentProblem", "Baseline", "ConstraintCost", "CouplingRow", "PlanOption", "PlanResult", "PlanSettings",
    "Predictions", "SCHEDULE_COLUMNS", "Solution", "Workload", "allowed_options", "baselines", "check_assignment",
    "choose_options", "evaluate", "list_plans", "list_workloads", "load_options", "load_plan", "load_workload",
    "make_plan", "options_from_fits", "parse_workload", "pareto_curve", "plan_workload", "planning_tokens",
    "predict_options", "read_workload", "read_workload_upload", "schedule_csv", "solve", "store_plan",
    "store_workload", "workload_from_frame", "write_schedule",
]
