-- What the store says each recipe scores: one row per (checkpoint, benchmark, eval_set,
-- metric_name, recipe_id), from the latest COMPLETED run that evaluated that recipe on that
-- sample set (run_evaluations: the run's shards combined, stderr from per-sample scores).
-- Runs that are running, were killed, failed or were interrupted never count here; their
-- partial work stays visible in run_evaluations (with its status). Two runs are never pooled:
-- n_runs says how many completed runs evaluated the same recipe on the same set, the row is the
-- latest of them.
WITH completed AS (
    SELECT *
    FROM run_evaluations
    WHERE status = 'completed'
)

SELECT
    * EXCLUDE (status),
    count(*) OVER (PARTITION BY checkpoint, benchmark, eval_set, metric_name, recipe_id) AS n_runs
FROM completed
QUALIFY row_number() OVER (
    PARTITION BY checkpoint, benchmark, eval_set, metric_name, recipe_id
    ORDER BY run_ended_at DESC, run_id DESC
) = 1
