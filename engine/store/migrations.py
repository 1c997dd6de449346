"""The schema, as an ordered list of migrations.

Each migration runs in one transaction together with the row that records it in
``schema_version``, so a file is always at exactly one known version. Never edit a
migration that has shipped: add a new one at the end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``version`` is its position, counted from 1."""

    version: int
    description: str
    statements: tuple[str, ...]


SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description VARCHAR NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
)
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "catalog: settings, models, devices",
        (
            """
            CREATE TABLE settings (
                key        VARCHAR PRIMARY KEY,
                value      VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
            )
            """,
            """
            CREATE TABLE models (
                name              VARCHAR PRIMARY KEY,
                backend           VARCHAR NOT NULL,   -- transformers | llama.cpp | external
                path              VARCHAR,            -- local directory/file, 'hub:owner/name', or NULL
                accuracy          DOUBLE,             -- a fraction in [0, 1]
                accuracy_source   VARCHAR,            -- where the score came from
                params_b          DOUBLE,             -- parameters, billions
                notes             VARCHAR,
                is_demo           BOOLEAN NOT NULL DEFAULT false,
                trust_remote_code BOOLEAN NOT NULL DEFAULT false,
                created_at        TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                updated_at        TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                CHECK (accuracy IS NULL OR (accuracy >= 0 AND accuracy <= 1)),
                CHECK (backend IN ('transformers', 'llama.cpp', 'external'))
            )
            """,
            """
            CREATE TABLE devices (
                host          VARCHAR NOT NULL,
                name          VARCHAR NOT NULL,       -- cpu, cuda:0, ...
                kind          VARCHAR NOT NULL,       -- cpu | gpu
                description   VARCHAR,
                first_seen_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (host, name)
            )
            """,
        ),
    ),
    Migration(
        2,
        "profiling: jobs and measurements",
        (
            "CREATE SEQUENCE profiling_job_id_seq START 1",
            """
            CREATE TABLE profiling_jobs (
                id          BIGINT PRIMARY KEY DEFAULT nextval('profiling_job_id_seq'),
                model       VARCHAR NOT NULL,
                device      VARCHAR NOT NULL,
                host        VARCHAR NOT NULL,
                design      JSON NOT NULL,            -- the (input, output) points asked for
                settings    JSON,                     -- trials, bounds, seed, batch size, ...
                status      VARCHAR NOT NULL,         -- queued | running | done | failed | cancelled
                reason      VARCHAR,                  -- why it failed or was cancelled
                points_total INTEGER,
                points_done  INTEGER NOT NULL DEFAULT 0,
                pid         INTEGER,
                created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                started_at  TIMESTAMPTZ,
                finished_at TIMESTAMPTZ
            )
            """,
            "CREATE SEQUENCE measurement_id_seq START 1",
            """
            CREATE TABLE measurements (
                id               BIGINT PRIMARY KEY DEFAULT nextval('measurement_id_seq'),
                job_id           BIGINT,              -- NULL for imported rows
                origin           VARCHAR NOT NULL,    -- profiled | imported | executed
                model            VARCHAR NOT NULL,
                device           VARCHAR NOT NULL,
                host             VARCHAR,
                input_tokens     INTEGER NOT NULL,
                output_tokens    INTEGER NOT NULL,
                batch_size       INTEGER NOT NULL DEFAULT 1,
                trial            INTEGER,
                runtime_s        DOUBLE NOT NULL,
                energy_j         DOUBLE,              -- NULL when it could not be measured, never 0
                energy_source    VARCHAR,             -- measured | estimated
                energy_method    VARCHAR,             -- sensors used, or the estimate's method
                gpu_energy_j     DOUBLE,
                cpu_energy_j     DOUBLE,
                dram_energy_j    DOUBLE,
                idle_power_w     DOUBLE,
                warnings         VARCHAR,
                library_versions JSON,
                started_at       TIMESTAMPTZ,
                finished_at      TIMESTAMPTZ,
                recorded_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                CHECK (input_tokens > 0 AND output_tokens > 0),
                CHECK (runtime_s >= 0),
                CHECK (energy_source IS NULL OR energy_source IN ('measured', 'estimated'))
            )
            """,
        ),
    ),
    Migration(
        3,
        "fits, workloads, plans, executions",
        (
            "CREATE SEQUENCE fit_id_seq START 1",
            """
            CREATE TABLE fits (
                id            BIGINT PRIMARY KEY DEFAULT nextval('fit_id_seq'),
                model         VARCHAR NOT NULL,
                device        VARCHAR NOT NULL,
                energy_scope  VARCHAR NOT NULL,       -- total | dynamic
                target        VARCHAR NOT NULL,       -- energy | runtime
                form          VARCHAR NOT NULL,
                coefficients  JSON NOT NULL,
                r2            DOUBLE,
                cv_mape       DOUBLE,                 -- a fraction
                n_points      INTEGER,
                domain        JSON,
                source        VARCHAR NOT NULL DEFAULT 'measured',  -- measured | published
                details       JSON,                   -- software versions, measurement ids, ...
                created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
            )
            """,
            "CREATE SEQUENCE workload_id_seq START 1",
            """
            CREATE TABLE workloads (
                id          BIGINT PRIMARY KEY DEFAULT nextval('workload_id_seq'),
                name        VARCHAR NOT NULL,
                source_file VARCHAR,
                n_queries   INTEGER NOT NULL,
                created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
            )
            """,
            """
            CREATE TABLE workload_queries (
                workload_id       BIGINT NOT NULL,
                query_id          VARCHAR NOT NULL,
                prompt            VARCHAR,
                input_tokens      INTEGER,
                output_tokens     INTEGER,
                max_output_tokens INTEGER,
                min_accuracy      DOUBLE,
                category          VARCHAR,
                PRIMARY KEY (workload_id, query_id)
            )
            """,
            "CREATE SEQUENCE plan_id_seq START 1",
            """
            CREATE TABLE plans (
                id              BIGINT PRIMARY KEY DEFAULT nextval('plan_id_seq'),
                workload_id     BIGINT,
                objective       VARCHAR NOT NULL,     -- energy | zeta
                energy_scope    VARCHAR NOT NULL,     -- total | dynamic
                accuracy_target DOUBLE,
                accuracy_mode   VARCHAR,              -- query | token
                deadline_s      DOUBLE,
                zeta            DOUBLE,
                status          VARCHAR NOT NULL,
                energy_j        DOUBLE,
                lower_bound_j   DOUBLE,
                gap             DOUBLE,
                solve_s         DOUBLE,
                accuracy        DOUBLE,
                params          JSON,
                baselines       JSON,
                created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
            )
            """,
            """
            CREATE TABLE plan_assignments (
                plan_id             BIGINT NOT NULL,
                query_id            VARCHAR NOT NULL,
                model               VARCHAR NOT NULL,
                device              VARCHAR NOT NULL,
                input_tokens        INTEGER NOT NULL,
                output_tokens       INTEGER NOT NULL,
                predicted_energy_j  DOUBLE,
                predicted_runtime_s DOUBLE,
                accuracy            DOUBLE,
                device_start_s      DOUBLE,
                in_domain           BOOLEAN,
                PRIMARY KEY (plan_id, query_id)
            )
            """,
            "CREATE SEQUENCE execution_id_seq START 1",
            """
            CREATE TABLE executions (
                id          BIGINT PRIMARY KEY DEFAULT nextval('execution_id_seq'),
                plan_id     BIGINT,
                host        VARCHAR,
                status      VARCHAR NOT NULL,         -- queued | running | done | failed | cancelled
                reason      VARCHAR,
                pid         INTEGER,
                created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                started_at  TIMESTAMPTZ,
                finished_at TIMESTAMPTZ
            )
            """,
            """
            CREATE TABLE execution_results (
                execution_id        BIGINT NOT NULL,
                query_id            VARCHAR NOT NULL,
                model               VARCHAR NOT NULL,
                device              VARCHAR NOT NULL,
                input_tokens        INTEGER NOT NULL,
                output_tokens       INTEGER NOT NULL,
                runtime_s           DOUBLE,
                energy_j            DOUBLE,           -- NULL when it could not be measured
                energy_source       VARCHAR,          -- measured | estimated
                energy_method       VARCHAR,
                predicted_energy_j  DOUBLE,
                predicted_runtime_s DOUBLE,
                started_at          TIMESTAMPTZ,
                finished_at         TIMESTAMPTZ,
                PRIMARY KEY (execution_id, query_id)
            )
            """,
        ),
    ),
    Migration(
        4,
        "execution progress; per-query results keep the answer, the plan's counts and provenance",
        (
            "ALTER TABLE executions ADD COLUMN queries_total INTEGER",
            "ALTER TABLE executions ADD COLUMN queries_done INTEGER DEFAULT 0",
            "ALTER TABLE executions ADD COLUMN settings JSON",
            "ALTER TABLE execution_results ADD COLUMN position INTEGER",
            "ALTER TABLE execution_results ADD COLUMN prompt_kind VARCHAR",  # text or tokens
            "ALTER TABLE execution_results ADD COLUMN generated_text VARCHAR",
            "ALTER TABLE execution_results ADD COLUMN planned_input_tokens INTEGER",
            "ALTER TABLE execution_results ADD COLUMN planned_output_tokens INTEGER",
            "ALTER TABLE execution_results ADD COLUMN predicted_energy_uncertainty_j DOUBLE",
            "ALTER TABLE execution_results ADD COLUMN idle_power_w DOUBLE",
            "ALTER TABLE execution_results ADD COLUMN stopped VARCHAR",  # end of answer, output cap
            "ALTER TABLE execution_results ADD COLUMN category VARCHAR",
            "ALTER TABLE execution_results ADD COLUMN error VARCHAR",
            "ALTER TABLE execution_results ADD COLUMN measurement_id BIGINT",
        ),
    ),
    # Planning with batches.
    Migration(
        5,
        "plans choose batch sizes: each assignment's batch (id, and the requests it holds)",
        (
            # Every member of a batch has the same batch_id (numbered from 1 within the plan)
            # and batch_size; NULL in plans stored before batching and in imported schedules
            # without these columns (each query then runs on its own).
            "ALTER TABLE plan_assignments ADD COLUMN batch_id INTEGER",
            "ALTER TABLE plan_assignments ADD COLUMN batch_size INTEGER",
        ),
    ),
    # Executing batches. Migration 5 already added the two plan_assignments columns; IF NOT
    # EXISTS keeps a database that has them either way.
    Migration(
        6,
        "executions run batches: each plan assignment's batch, each executed batch as measured, "
        "each request's share of it",
        (
            # Every member of a batch has the same batch_id (numbered from 1 within the plan) and
            # batch_size; NULL in older plans and in schedules without them (the query runs alone).
            "ALTER TABLE plan_assignments ADD COLUMN IF NOT EXISTS batch_id INTEGER",
            "ALTER TABLE plan_assignments ADD COLUMN IF NOT EXISTS batch_size INTEGER",
            # Per request: its batch, and its share of the batch's energy and runtime (the rule is
            # engine.execution.worker.SHARE_RULE); the computation spent for it on nobody's answer.
            "ALTER TABLE execution_results ADD COLUMN IF NOT EXISTS batch_id INTEGER",
            "ALTER TABLE execution_results ADD COLUMN IF NOT EXISTS batch_size INTEGER",
            "ALTER TABLE execution_results ADD COLUMN IF NOT EXISTS energy_share DOUBLE",
            "ALTER TABLE execution_results ADD COLUMN IF NOT EXISTS wasted_decode_tokens INTEGER",
            "ALTER TABLE execution_results ADD COLUMN IF NOT EXISTS padding_tokens INTEGER",
            """
            CREATE TABLE IF NOT EXISTS execution_batches (
                execution_id         BIGINT NOT NULL,
                batch_id             INTEGER NOT NULL,  -- the plan's (or the query's own, for a query alone)
                model                VARCHAR NOT NULL,
                device               VARCHAR NOT NULL,
                position             INTEGER,           -- its place in its device's run
                batch_size           INTEGER NOT NULL,  -- planned B (the option's)
                members              INTEGER NOT NULL,  -- requests it held (the last of an option may hold fewer)
                query_ids            JSON,              -- its members, in the order they were fed
                runtime_s            DOUBLE,            -- wall time of the whole batch (a member's latency)
                energy_j             DOUBLE,            -- the whole batch's, NULL when unknown, never 0
                energy_source        VARCHAR,           -- measured | estimated
                energy_method        VARCHAR,
                idle_power_w         DOUBLE,
                input_tokens         INTEGER,           -- run, all members (padding not included)
                output_tokens        INTEGER,           -- generated, all members (waste not included)
                max_input_tokens     INTEGER,
                decode_steps         INTEGER,           -- generation steps the batch ran (its longest answer)
                wasted_decode_tokens INTEGER,           -- steps run for members already finished
                padding_tokens       INTEGER,           -- padding positions run
                predicted_energy_j   DOUBLE,            -- the sum of its members' predictions
                predicted_runtime_s  DOUBLE,
                share_rule           VARCHAR,           -- how members' shares were taken
                refit_shape          VARCHAR,           -- exact | padded | NULL (kept out of refits)
                refit_note           VARCHAR,           -- why padded, or why kept out
                measurement_id       BIGINT,
                error                VARCHAR,           -- why it failed (every member failed with it)
                started_at           TIMESTAMPTZ,
                finished_at          TIMESTAMPTZ,
                PRIMARY KEY (execution_id, batch_id)
            )
            """,
        ),
    ),
    # Converged and unconverged points; adaptive profiling.
    Migration(
        7,
        "profiling: how each point's trials ended (converged or not), and the adaptive design's rounds",
        (
            # One row per (job, point), written when the point's trials are over (replaced when
            # an adaptive job adds trials). Jobs measured before this table have no rows: the
            # readers assess their points from the trials (engine.profiling.jobs.point_outcomes).
            """
            CREATE TABLE profiling_points (
                job_id         BIGINT NOT NULL,
                input_tokens   INTEGER NOT NULL,
                output_tokens  INTEGER NOT NULL,
                trials         INTEGER NOT NULL,
                converged      BOOLEAN NOT NULL,  -- the 95% CI of the mean met the job's bound
                stopped        VARCHAR NOT NULL,  -- converged | max-trials | fixed-trials | budget | settled
                runtime_ci_rel DOUBLE,            -- CI half-width / mean, runtime
                energy_ci_rel  DOUBLE,            -- CI half-width / mean, energy (NULL when not measured)
                updated_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (job_id, input_tokens, output_tokens)
            )
            """,
            # One row per fit-and-decide round of an adaptive job.
            """
            CREATE TABLE profiling_rounds (
                job_id             BIGINT NOT NULL,
                round              INTEGER NOT NULL,
                elapsed_s          DOUBLE NOT NULL,  -- since the job's model started loading
                trials             INTEGER NOT NULL,
                points             INTEGER NOT NULL,
                energy_cv_mape     DOUBLE,           -- fractions, as the fits table
                runtime_cv_mape    DOUBLE,
                energy_noise_mape  DOUBLE,           -- the floor trial-to-trial noise sets
                runtime_noise_mape DOUBLE,
                decision           VARCHAR,          -- what the round did next, or why it stopped
                recorded_at        TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (job_id, round)
            )
            """,
        ),
    ),
    # Cluster device names.
    Migration(
        8,
        "device names: every measurement this app took records the host that took it (a node's device, its node)",
        (
            # The rule (README, "Device names"): a short name (cpu, cuda:0) is a device of the app's own host,
            # a qualified one (node/cuda:0) a device of that cluster node; nothing stored is renamed. A
            # profiled or executed row names the host that measured it: the app's host, as its job or
            # execution recorded it, or for a node's device the node. Imported rows keep no host (their file
            # has none).
            """
            UPDATE measurements SET host = CASE WHEN strpos(device, '/') > 0 THEN split_part(device, '/', 1)
                                                ELSE (SELECT j.host FROM profiling_jobs j WHERE j.id = measurements.job_id) END
            WHERE origin = 'profiled' AND job_id IS NOT NULL
              AND (host IS NULL OR (strpos(device, '/') > 0 AND host <> split_part(device, '/', 1)))
            """,
            """
            UPDATE measurements SET host = CASE WHEN strpos(device, '/') > 0 THEN split_part(device, '/', 1)
                                                ELSE coalesce(
                                                    (SELECT e.host FROM execution_results r
                                                     JOIN executions e ON e.id = r.execution_id
                                                     WHERE r.measurement_id = measurements.id LIMIT 1),
                                                    (SELECT e.host FROM execution_batches b
                                                     JOIN executions e ON e.id = b.execution_id
                                                     WHERE b.measurement_id = measurements.id LIMIT 1)) END
            WHERE origin = 'executed'
              AND (host IS NULL OR (strpos(device, '/') > 0 AND host <> split_part(device, '/', 1)))
            """,
        ),
    ),
    # The batch axis of profiling (issue 13).
    Migration(
        9,
        "profiling points: a point is (input_tokens, output_tokens, batch_size); earlier points are at batch size 1",
        (
            # A job with a batch axis measures the same (τin, τout) at several batch sizes, each a point of its own
            # with its own outcome. DuckDB cannot change a primary key in place: the table is rebuilt.
            """
            CREATE TABLE profiling_points_b (
                job_id         BIGINT NOT NULL,
                input_tokens   INTEGER NOT NULL,
                output_tokens  INTEGER NOT NULL,
                batch_size     INTEGER NOT NULL DEFAULT 1,  -- requests run together in each trial of the point
                trials         INTEGER NOT NULL,
                converged      BOOLEAN NOT NULL,
                stopped        VARCHAR NOT NULL,
                runtime_ci_rel DOUBLE,
                energy_ci_rel  DOUBLE,
                updated_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (job_id, input_tokens, output_tokens, batch_size)
            )
            """,
            """
            INSERT INTO profiling_points_b (job_id, input_tokens, output_tokens, batch_size, trials, converged, stopped,
                                            runtime_ci_rel, energy_ci_rel, updated_at)
            SELECT job_id, input_tokens, output_tokens, 1, trials, converged, stopped, runtime_ci_rel, energy_ci_rel,
                   updated_at FROM profiling_points
            """,
            "DROP TABLE profiling_points",
            "ALTER TABLE profiling_points_b RENAME TO profiling_points",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
