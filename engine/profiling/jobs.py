"""Profiling jobs: their settings, their state in the database, and their progress.

Inference runs in a separate worker process (``python -m engine.profiling.worker``) so
that a crash, hang or kill of a backend cannot take the app or the CLI down. Starting,
watching, cancelling and resuming it is the lifecycle every long run shares
(:mod:`engine.runs`); this module names it for jobs. A device runs one run at a time:
:func:`create_job` refuses a device that a job or an execution holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from engine import catalog, runs
from engine.catalog import model_context_length  # moved to engine.catalog; still importable from here
from engine.backends.base import MAX_BATCH_SIZE
from engine.cluster.naming import is_qualified
from engine.errors import DeviceUnavailableError, InputError, PlannerError, Problem
from engine.profiling.design import DEFAULT_BATCH_SIZES, Design, build_design, parse_batch_sizes, run_order
from engine.profiling.stopping import StopRule, point_complete, point_outcome
from engine.runs import ACTIVE, FINISHED, PROFILING
from engine.store import Store


#: An adaptive job's time budget when none is given, and the range one may have (seconds).
DEFAULT_BUDGET_S = 120.0
MIN_BUDGET_S, MAX_BUDGET_S = 10.0, 86_400.0


@dataclass(frozen=True)
class ProfileSettings:
    """How a job measures. Times in seconds; ``rel_bound`` a fraction of the mean."""

    rel_bound: float = 0.05
    min_trials: int = 3
    max_trials: int = 25
    warmup_runs: int = 2
    cooldown_s: float = 0.0
    idle_s: float = 5.0
    seed: int = 0
    batch_size: int = 1  # the older option: identical requests run by the backend's generate (transformers only)
    backend_options: dict = field(default_factory=dict)
    budget_s: float | None = None  # adaptive design only: wall time from loading the model to the last trial
    #: The batch axis: every (τin, τout) of the design is measured at each of these batch sizes, a
    #: trial being one batch of B requests of that shape run together through the backend's
    #: ``generate_batch`` (its energy and runtime are the batch's). (1,): one request at a time.
    batch_sizes: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        # Stored as a JSON list: kept a tuple, so that settings compare and hash as they were made.
        if not isinstance(self.batch_sizes, tuple):
            object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes) if isinstance(self.batch_sizes, list)
                               else self.batch_sizes)

    def trial_batch_size(self, point) -> int:
        """Requests one trial of a design point runs: the point's batch size, or the older option's."""
        return point.batch_size if point.batch_size != 1 else self.batch_size

    @property
    def stop_rule(self) -> StopRule:
        return StopRule(rel_bound=self.rel_bound, min_trials=self.min_trials, max_trials=self.max_trials)

    def validate(self) -> "ProfileSettings":
        """The settings, or InputError naming each one out of range."""
        problems = []
        checks = [
            ("relative CI bound", 0 < self.rel_bound <= 1, f"{self.rel_bound}",
             "a fraction in (0, 1], e.g. 0.05 for ±5%"),
            ("minimum trials", 1 <= self.min_trials <= 1000, f"{self.min_trials}", "1 to 1000"),
            ("maximum trials", self.min_trials <= self.max_trials <= 1000, f"{self.max_trials}",
             f"from the minimum trials ({self.min_trials}) to 1000"),
            ("warm-up runs", 0 <= self.warmup_runs <= 100, f"{self.warmup_runs}", "0 to 100"),
            ("cool-down", 0 <= self.cooldown_s <= 600, f"{self.cooldown_s}", "0 to 600 seconds"),
            ("idle baseline", 0.5 <= self.idle_s <= 600, f"{self.idle_s}", "0.5 to 600 seconds"),
            ("batch size", 1 <= self.batch_size <= MAX_BATCH_SIZE, f"{self.batch_size}", f"1 to {MAX_BATCH_SIZE}"),
            ("budget", self.budget_s is None or MIN_BUDGET_S <= self.budget_s <= MAX_BUDGET_S, f"{self.budget_s} s",
             f"{MIN_BUDGET_S:g} to {MAX_BUDGET_S:g} seconds"),
        ]
        for where, ok, value, expected in checks:
            if not ok:
                problems.append(Problem(where, f"{value} is out of range", None, expected))
        try:
            sizes = parse_batch_sizes(self.batch_sizes)
        except InputError as exc:
            problems.extend(exc.problems)
        else:
            if self.batch_size != 1 and sizes != (1,):
                problems.append(Problem("batch size", f"both the older batch size ({self.batch_size}) and batch sizes "
                                        f"({', '.join(map(str, sizes))}) are set", None,
                                        "batch sizes alone (a batch axis), e.g. 1,4,16"))
        if problems:
            raise InputError(problems)
        return replace(self, batch_sizes=sizes)


@dataclass(frozen=True)
class Job:
    """A profiling job as stored."""

    id: int
    model: str
    device: str
    host: str
    design: Design
    settings: ProfileSettings
    status: str
    reason: str | None
    points_total: int
    points_done: int
    pid: int | None
    created_at: object
    started_at: object
    finished_at: object


def _job_from_row(row: dict) -> Job:
    settings = json.loads(row["settings"]) if row["settings"] else {}
    return Job(id=int(row["id"]), model=row["model"], device=row["device"], host=row["host"],
               design=Design.from_dict(json.loads(row["design"])), settings=ProfileSettings(**settings),
               status=row["status"], reason=row["reason"], points_total=int(row["points_total"] or 0),
               points_done=int(row["points_done"] or 0), pid=None if pd.isna(row["pid"]) else int(row["pid"]),
               created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"])


def get_job(store: Store, job_id: int) -> Job:
    """One job, or InputError when there is none with that id."""
    frame = store.query_df("SELECT * FROM profiling_jobs WHERE id = ?", [int(job_id)])
    if frame.empty:
        raise InputError(Problem("job", f"no profiling job {job_id}", None, "an id from the job list"))
    return _job_from_row(frame.iloc[0].to_dict())


def list_jobs(store: Store, limit: int = 50) -> pd.DataFrame:
    """The latest jobs, newest first, with their trial counts.

    ``unconverged`` counts the job's points whose trials reached the trial cap without
    meeting the confidence rule (see :func:`point_outcomes`); None while no point of the
    job is over.
    """
    frame = store.query_df(
        """SELECT j.id, j.model, j.device, j.status, j.points_done, j.points_total,
                  (SELECT count(*) FROM measurements m WHERE m.job_id = j.id) AS trials,
                  j.reason, j.created_at, j.started_at, j.finished_at
           FROM profiling_jobs j ORDER BY j.id DESC LIMIT ?""", [limit])
    outcomes = point_outcomes(store, frame["id"].tolist()) if len(frame) else point_outcomes(store, [])
    loose = outcomes["unconverged"].astype(bool).groupby(outcomes["job_id"]).sum()
    counts = frame["id"].map(loose)
    frame.insert(frame.columns.get_loc("trials") + 1, "unconverged",
                 pd.array([None if pd.isna(c) else int(c) for c in counts], dtype="Int64"))
    return frame


#: Columns of :func:`point_outcomes`.
OUTCOME_COLUMNS = ("job_id", "model", "device", "input_tokens", "output_tokens", "batch_size", "trials", "converged",
                   "unconverged", "stopped", "runtime_ci_rel", "energy_ci_rel", "assessed")


def point_outcomes(store: Store, job_ids: Iterable[int] | None = None, *, model: str | None = None,
                   device: str | None = None) -> pd.DataFrame:
    """How each profiled point's trials ended: converged to the job's confidence bound, or not.

    One row per (job, point) whose trials are over, for the jobs given (all without
    ``job_ids``), narrowed by ``model``/``device``. Columns :data:`OUTCOME_COLUMNS`:
    ``converged`` (bool: the interval met the bound), ``unconverged`` (bool: the trials
    reached the cap without that: what the job's reason, ``jobs list`` and the fits
    flag), ``stopped`` (converged | max-trials | fixed-trials: the job asked for as many
    minimum as maximum trials | budget, settled: an adaptive design ended the point sooner),
    ``runtime_ci_rel``/``energy_ci_rel`` (the 95% CI half-width of the mean over the
    mean; a fraction), ``assessed``: ``stored`` (recorded by the worker) or ``from
    trials`` (a finished job measured before points were recorded: its points are judged
    now by the job's own rule; only points the rule had finished are listed).
    """
    where, params = [], []
    if job_ids is not None:
        where.append("list_contains(?, j.id)")
        params.append([int(i) for i in job_ids])
    for column, value in (("model", model), ("device", device)):
        if value is not None:
            where.append(f"j.{column} = ?")
            params.append(value)
    clause = (" AND " + " AND ".join(where)) if where else ""
    stored = store.query_df(
        f"""SELECT p.job_id, j.model, j.device, p.input_tokens, p.output_tokens, p.batch_size, p.trials, p.converged,
                   p.stopped = 'max-trials' AS unconverged, p.stopped, p.runtime_ci_rel, p.energy_ci_rel,
                   'stored' AS assessed
            FROM profiling_points p JOIN profiling_jobs j ON j.id = p.job_id WHERE true{clause}
            ORDER BY p.job_id, p.input_tokens, p.output_tokens, p.batch_size""", params)
    legacy = store.query_df(
        f"""SELECT j.id, j.model, j.device, CAST(j.settings AS VARCHAR) AS settings FROM profiling_jobs j
            WHERE j.status IN ({", ".join("?" * len(FINISHED))})
              AND NOT EXISTS (SELECT 1 FROM profiling_points p WHERE p.job_id = j.id)
              AND EXISTS (SELECT 1 FROM measurements m WHERE m.job_id = j.id){clause}""", [*FINISHED, *params])
    frames = [stored] + [_outcomes_from_trials(store, row) for row in legacy.itertuples()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=stored[c].dtype) for c in OUTCOME_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(OUTCOME_COLUMNS)]


def _outcomes_from_trials(store: Store, job) -> pd.DataFrame:
    """The finished points of a job that recorded none, judged from its trials by its own rule."""
    settings = ProfileSettings(**(json.loads(job.settings) if job.settings else {}))
    rule = settings.stop_rule
    trials = store.query_df("SELECT input_tokens, output_tokens, coalesce(batch_size, 1) AS batch_size, runtime_s, "
                            "energy_j FROM measurements WHERE job_id = ? ORDER BY id", [int(job.id)])
    rows = []
    for (tokens_in, tokens_out, size), group in trials.groupby(["input_tokens", "output_tokens", "batch_size"],
                                                               sort=True):
        energies = [None if pd.isna(e) else float(e) for e in group.energy_j]
        if not point_complete(group.runtime_s.tolist(), energies, rule):
            continue  # cut short by a failure or a cancel: not over, nothing to judge
        outcome = point_outcome(tokens_in, tokens_out, group.runtime_s.tolist(), energies, rule, batch_size=size)
        rows.append({"job_id": int(job.id), "model": job.model, "device": job.device, **outcome.to_row(),
                     "unconverged": outcome.unconverged, "assessed": "from trials"})
    return pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))


#: Columns of :func:`adaptive_rounds`.
ROUND_COLUMNS = ("round", "elapsed_s", "trials", "points", "energy_cv_mape", "runtime_cv_mape", "energy_noise_mape",
                 "runtime_noise_mape", "decision")


def adaptive_rounds(store: Store, job_id: int) -> pd.DataFrame:
    """The fit-and-decide rounds of an adaptive job, in order (empty for other designs).

    Columns :data:`ROUND_COLUMNS`: after each round's trials, the cross-validated error
    its fits reached (``*_cv_mape``, fractions; None when a fit could not be made), the
    floor that trial-to-trial noise sets on that error (``*_noise_mape``), the seconds
    since the model started loading, and the decision taken (what to measure next, or
    why it stopped). The last row is the error the job reached.
    """
    return store.query_df(f"SELECT {', '.join(ROUND_COLUMNS)} FROM profiling_rounds WHERE job_id = ? ORDER BY round",
                          [int(job_id)])


def prepare_job(store: Store, model: str, device: str, design_kind: str = "quick", *, inputs=None, outputs=None,
                n_points: int = 16, settings: ProfileSettings | None = None, default_batch_axis: bool = False
                ) -> tuple[catalog.CatalogEntry, str, Design, ProfileSettings]:
    """Validate a job before anything is stored; returns the model, the device as stored, the design, the settings.

    ``default_batch_axis``: the user named no batch sizes (``profile`` without
    ``--batch-sizes``, the Profile page's default). A fixed design then takes
    :data:`~engine.profiling.design.DEFAULT_BATCH_SIZES`, less the sizes whose largest batch
    does not fit in the device's free memory (each named in ``design.dropped``, not
    refused); the adaptive design, and a job with the older ``batch_size`` option, keep
    ``settings.batch_sizes``. On a cluster node's device, whose free memory is read on the
    node, the default stays batch size 1 (said in ``design.dropped``). Sizes the user named
    are refused when they do not fit.
    """
    settings = (settings or ProfileSettings()).validate()
    default_axis = default_batch_axis and design_kind != "adaptive" and settings.batch_size == 1
    entry = catalog.get_model(store, model)
    if entry is None:
        raise InputError(Problem("model", f"no model named {model!r} in the catalog", None, "a name from `models list`"))
    if entry.backend == "external" or not entry.path:
        raise InputError(Problem("model", f"{model} has no local weights (external), so it cannot be profiled here",
                                 None, "a model with a path; import its measurements instead"))
    if entry.path.startswith(catalog.HUB_PREFIX):
        raise InputError(Problem("model", f"{model} is a hub id; download it and add its local directory", None,
                                 "a local model directory or .gguf file"))
    if entry.backend == "llama.cpp" and settings.batch_size != 1:
        # The older option batches generate(), which llama-cpp-python's Llama runs one sequence at a time;
        # llama.cpp batches run through the batch axis (generate_batch, one sequence id per request).
        raise InputError(Problem("batch size", f"{settings.batch_size}: the older batch-size option runs identical "
                                 "requests through generate(), which the llama.cpp backend does one at a time", None,
                                 f"--batch-sizes 1,{settings.batch_size} (a batch axis), which llama.cpp runs as "
                                 "real batches"))
    try:
        device = runs.check_device(device)
    except DeviceUnavailableError as exc:
        raise InputError(Problem("device", str(exc), None, "cpu, or cuda:N for a GPU this host has, or NODE/DEVICE "
                                 "for a cluster node's")) from None
    files_here = catalog.resolve_model_path(entry.path).exists()
    # A cluster node's device: the node checks its own files before it measures, naming itself and the path.
    if not files_here and not is_qualified(device):
        raise InputError(Problem("model", f"{model}'s files are gone from {entry.path}", None,
                                 "restore them, or `models remove` and add it again"))
    if design_kind == "adaptive" and settings.budget_s is None:
        settings = replace(settings, budget_s=DEFAULT_BUDGET_S)
    elif design_kind != "adaptive" and settings.budget_s is not None:
        raise InputError(Problem("budget", f"a time budget ({settings.budget_s:g} s) applies to the adaptive design "
                                 f"only, not to {design_kind!r}", None, "the adaptive design, or no budget"))
    settings, default_axis, node_note = _default_batch_axis(settings, device, default_axis)
    design = build_design(design_kind, inputs=inputs, outputs=outputs, n_points=n_points,
                          context_length=model_context_length(entry) if files_here else None, seed=settings.seed,
                          batch_sizes=settings.batch_sizes)
    design = replace(design, dropped=design.dropped + node_note)
    if files_here and max(design.batch_sizes) > 1:
        if default_axis:  # the default: the sizes that do not fit are left out, and named
            design = drop_unfitting_batch_sizes(entry, device, design)
            settings = replace(settings, batch_sizes=design.batch_sizes)
        else:
            check_design_memory(entry, device, design)
    return entry, device, design, settings


def _default_batch_axis(settings: ProfileSettings, device: str, default_axis: bool
                        ) -> tuple[ProfileSettings, bool, tuple[str, ...]]:
    """The settings with the default batch axis where it applies (see :func:`prepare_job`), whether the
    memory check may then trim it, and the note a node's device gets instead."""
    if not default_axis:
        return settings, False, ()
    if is_qualified(device):
        # A node's free memory is read on the node, before each point, where a batch that does not fit
        # fails the job: the default stays one request at a time there; named sizes are the user's call.
        return replace(settings, batch_sizes=(1,)), False, (
            f"batch sizes {', '.join(map(str, DEFAULT_BATCH_SIZES[1:]))} (left out of the default batch axis: "
            f"{device}'s memory is judged on its node; name them with --batch-sizes to measure them)",)
    return replace(settings, batch_sizes=DEFAULT_BATCH_SIZES), True, ()


def check_design_memory(entry: catalog.CatalogEntry, device: str, design: Design, *,
                        memory_rule=None) -> None:
    """Refuse, before anything is stored or run, a design whose batches do not fit in the device's free memory.

    For each batch size above 1, its largest point (most tokens) is estimated
    (:mod:`engine.backends.memory`: KV cache for B × (τin + τout) tokens, activations and
    the weights, with a margin) against what the device has free now (available RAM on the
    CPU, NVML on a GPU). Where the sizes or the free memory cannot be read (unusual files,
    another host's device) nothing is refused here: the worker checks each batch again
    before it runs it (``generate_batch``). ``memory_rule`` replaces the rule read from the
    model's files (tests).

    Raises:
        InputError: one problem per batch size that does not fit, naming the memory needed
            and free, and the largest batch of that shape that would fit.
    """
    problems = [problem for _size, problem in unfitting_batch_sizes(entry, device, design, memory_rule=memory_rule)]
    if problems:
        raise InputError(problems)


def drop_unfitting_batch_sizes(entry: catalog.CatalogEntry, device: str, design: Design, *,
                               memory_rule=None) -> Design:
    """The design without the batch sizes that do not fit (see :func:`check_design_memory`),
    each named in ``dropped`` with the memory it needs; batch size 1 is always kept."""
    unfit = unfitting_batch_sizes(entry, device, design, memory_rule=memory_rule)
    if not unfit:
        return design
    sizes = {size for size, _problem in unfit}
    return Design(kind=design.kind, points=tuple(p for p in design.points if p.batch_size not in sizes),
                  dropped=design.dropped + tuple(f"batch size {problem.message} (left out of the default batch axis)"
                                                 for _size, problem in unfit))


def unfitting_batch_sizes(entry: catalog.CatalogEntry, device: str, design: Design, *,
                          memory_rule=None) -> list[tuple[int, Problem]]:
    """(batch size, problem) for each size above 1 whose largest point does not fit; [] when
    the memory cannot be judged here (see :func:`check_design_memory`)."""
    from engine.backends.memory import estimate_batch_memory, format_bytes, largest_fitting_batch
    from engine.planning.batches import batch_memory_rule

    if memory_rule is None:
        if is_qualified(device):
            return []  # a node's device: its free memory is the node's, checked there before each batch
        memory_rule, _why = batch_memory_rule(entry.backend, catalog.resolve_model_path(entry.path), device)
    if memory_rule is None:
        return []
    unfit = []
    for size in design.batch_sizes:
        if size == 1:
            continue
        largest = max((p for p in design.points if p.batch_size == size),
                      key=lambda p: (p.input_tokens + p.output_tokens, p.input_tokens))
        options = {"max_tokens_per_pass": memory_rule.max_tokens_per_pass}
        need = estimate_batch_memory(memory_rule.model, size, largest.input_tokens, largest.output_tokens, **options)
        if need.total_bytes <= memory_rule.free_bytes:
            continue
        fits = largest_fitting_batch(memory_rule.model, largest.input_tokens, largest.output_tokens,
                                     memory_rule.free_bytes, size - 1, **options)
        unfit.append((size, Problem("batch sizes", f"{size}: a {need.describe()}; {device} has "
                                    f"{format_bytes(memory_rule.free_bytes)} free", None,
                                    f"batch sizes up to {fits} for points of this size on {device}" if fits else
                                    f"shorter requests, or a device with more free memory than {device}")))
    return unfit


def create_job(store: Store, model: str, device: str, design_kind: str = "quick", **options) -> Job:
    """Validate and store a new queued job; refuses a second job on a busy device."""
    settings = options.pop("settings", None)
    entry, device, design, settings = prepare_job(store, model, device, design_kind, settings=settings, **options)
    busy = runs.run_on_device(store, device)
    if busy is not None:
        raise PlannerError(f"{str(busy).capitalize()} is already running on {device}; two runs on one device would "
                           "measure each other. Wait for it to finish or cancel it.")
    with store.transaction() as con:
        job_id = con.execute(
            """INSERT INTO profiling_jobs (model, device, host, design, settings, status, points_total)
               VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING id""",
            [entry.name, device, runs.host_name(), json.dumps(design.to_dict()), json.dumps(asdict(settings)),
             len(design.points)]).fetchone()[0]
    return get_job(store, job_id)


# -- the lifecycle, for jobs (see engine.runs) ------------------------------------------------

def start_worker(store: Store, job_id: int, *, watch: bool = True) -> runs.RunHandle:
    """Start the worker of a queued job; with ``watch``, a thread records how it ended."""
    return runs.start(store, PROFILING, job_id, watch=watch)


def watch_worker(store: Store, job_id: int, handle: runs.RunHandle) -> None:
    """Wait for a job's worker; if it ended without closing its job, close it with the reason."""
    runs.watch_until_done(store, PROFILING, job_id, handle)


def reconcile_jobs(store: Store) -> None:
    """Close the active jobs of this host whose worker is gone (killed while nobody watched)."""
    runs.reconcile(store, (PROFILING,))


def cancel_job(store: Store, job_id: int, *, grace_s: float = 5.0) -> Job:
    """Stop a job within seconds: ask its worker to stop, and kill it if it does not."""
    get_job(store, job_id)
    runs.cancel(store, PROFILING, job_id, grace_s=grace_s)
    return get_job(store, job_id)


def resume_job(store: Store, job_id: int) -> Job:
    """Queue a failed or cancelled job again; its worker skips the points already complete."""
    job = get_job(store, job_id)
    runs.check_resumable(store, PROFILING, job_id)
    busy = runs.run_on_device(store, job.device)
    if busy is not None:
        raise PlannerError(f"{str(busy).capitalize()} is running on {job.device}; resume job {job_id} when it is done.")
    runs.requeue(store, PROFILING, job_id)
    return get_job(store, job_id)


# -- progress -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """Where a job stands: points and trials done, time spent and (roughly) left.

    elapsed_s: the measuring time of the whole job, across its runs: the wall-clock time of
        the current (or last) run from its start, plus the time the trials stored by earlier
        runs took (their runtimes and cool-downs; the pauses between runs do not count).
        None before anything ran.
    remaining_s: the time the points left should take, from the points complete so far,
        less what the point in progress has already taken; never 0 while a point is left.
        None while nothing is known yet, and once every point is complete (the worker is
        only closing).
    """

    job: Job
    trials: int
    elapsed_s: float | None
    remaining_s: float | None
    points: pd.DataFrame  # per measured point: trials, mean runtime and energy, energy source, and once its
    #                       trials are over: converged, unconverged, stopped, ci_rel (see point_outcomes)


#: Time around each trial beyond its own runtime (reading the meter, storing the row), as a share of it.
TRIAL_OVERHEAD = 0.1


def job_progress(store: Store, job_id: int) -> Progress:
    """The progress of a job, from what is stored."""
    job = get_job(store, job_id)
    started = None if job.started_at is None or pd.isna(job.started_at) else pd.Timestamp(job.started_at)
    points = store.query_df(
        """SELECT input_tokens, output_tokens, coalesce(batch_size, 1) AS batch_size, count(*) AS trials,
                  avg(runtime_s) AS runtime_s,
                  avg(energy_j) AS energy_j, any_value(energy_source) AS energy_source, sum(runtime_s) AS total_runtime_s,
                  count(*) FILTER (WHERE ? IS NULL OR started_at < ?) AS earlier_trials,
                  coalesce(sum(runtime_s) FILTER (WHERE ? IS NULL OR started_at < ?), 0) AS earlier_runtime_s,
                  min(started_at) AS first_at, max(finished_at) AS last_at
           FROM measurements WHERE job_id = ? GROUP BY ALL ORDER BY input_tokens, output_tokens, batch_size""",
        [started, started, started, started, job.id])
    outcomes = point_outcomes(store, [job.id])
    outcomes["ci_rel"] = outcomes[["runtime_ci_rel", "energy_ci_rel"]].max(axis=1)
    points = points.merge(outcomes[["input_tokens", "output_tokens", "batch_size", "converged", "unconverged", "stopped",
                                    "ci_rel"]], how="left", on=["input_tokens", "output_tokens", "batch_size"])
    trials = int(points.trials.sum()) if len(points) else 0
    cooldown_s = job.settings.cooldown_s
    earlier_s = float(points.earlier_runtime_s.sum() + cooldown_s * points.earlier_trials.sum()) if len(points) else 0.0
    elapsed = None
    if started is not None:
        end = pd.Timestamp(job.finished_at) if job.status in FINISHED and not pd.isna(job.finished_at) \
            else pd.Timestamp.now(tz=started.tz)
        elapsed = max(0.0, (end - started).total_seconds()) + earlier_s
    elif earlier_s:
        elapsed = earlier_s  # queued again after a pause: the runs so far
    remaining = None
    if job.status in ACTIVE and job.settings.budget_s is not None:
        remaining = max(job.settings.budget_s - (elapsed or 0.0), 0.0)  # an adaptive job stops at its budget
    elif job.status in ACTIVE:
        remaining = _remaining_s(job, points)
    return Progress(job=job, trials=trials, elapsed_s=elapsed, remaining_s=remaining,
                    points=points.drop(columns=["earlier_trials", "earlier_runtime_s"]))


def _remaining_s(job: Job, points: pd.DataFrame) -> float | None:
    """The time the points left should take (see :class:`Progress`)."""
    left = job.points_total - job.points_done
    if left <= 0 or points.empty:
        return None
    # The worker completes points in its run order: the first points_done of it are complete.
    complete = {(p.input_tokens, p.output_tokens, job.settings.trial_batch_size(p))
                for p in run_order(job.design.points, job.settings.seed)[:job.points_done]}
    is_complete = [key in complete for key in zip(points.input_tokens, points.output_tokens, points.batch_size)]
    cost_s = (points.total_runtime_s * (1 + TRIAL_OVERHEAD) + job.settings.cooldown_s * points.trials)
    trial_s = float(cost_s.sum() / points.trials.sum())
    done, in_progress = cost_s[is_complete], cost_s[[not c for c in is_complete]]
    if len(done):
        per_point_s = float(done.mean())
    else:  # the first point: at least the fewest trials the stop rule takes
        per_point_s = trial_s * max(job.settings.min_trials, int(points.trials.max()))
    return max(per_point_s * left - float(in_progress.sum()), trial_s)


def estimate_duration_s(store: Store, model: str, device: str, design: Design,
                        settings: ProfileSettings) -> tuple[float, float] | None:
    """(fewest, most) seconds a job should take, from this model's earlier runtimes on this device.

    Where batches of two or more sizes were measured before, a trial's runtime is fitted
    per batch (a fixed cost, prefill growing with B·τin, decode steps with τout and
    B·τout); otherwise from single requests, a batch of B taking between one of them (the
    fewest) and B of them (the most). None when there are no earlier measurements to
    go by, except for an adaptive job, which takes its budget at most (and at most that, at
    least, without history).
    """
    history = store.query_df(
        "SELECT input_tokens, output_tokens, coalesce(batch_size, 1) AS batch_size, avg(runtime_s) AS runtime_s "
        "FROM measurements WHERE model = ? AND device = ? GROUP BY ALL", [model, device])
    batched = history.batch_size.nunique() >= 2 and len(history) >= 5
    if not batched:
        history = history[history.batch_size == 1]
    if len(history) < 3:
        return None if settings.budget_s is None else (settings.budget_s, settings.budget_s)

    def features(tin, tout, size):
        tin, tout, size = (np.asarray(v, dtype=float) for v in (tin, tout, size))
        columns = [np.ones_like(tin), size * tin, tout, size * tout] if batched else [np.ones_like(tin), tin, tout]
        return np.column_stack(columns)

    coef, *_ = np.linalg.lstsq(features(history.input_tokens, history.output_tokens, history.batch_size),
                               history.runtime_s.to_numpy(), rcond=None)
    sizes = [settings.trial_batch_size(p) for p in design.points]
    predicted = features([p.input_tokens for p in design.points], [p.output_tokens for p in design.points],
                         sizes if batched else np.ones(len(sizes))) @ coef
    fewest = [max(float(t), 0.001) for t in predicted]
    most = [t * (1 if batched else size) for t, size in zip(fewest, sizes)]
    fixed = settings.idle_s + 5.0  # idle baseline plus loading the model
    per_point_extra = settings.cooldown_s
    low = fixed + sum((t + per_point_extra) * settings.min_trials for t in fewest)
    high = fixed + sum((t + per_point_extra) * settings.max_trials for t in most)
    if settings.budget_s is not None:  # adaptive: at least its first points, at most its budget
        return min(low, settings.budget_s), settings.budget_s
    return low, high
