-- The latest row of each run. Runs are append-only: a run writes a row when it starts and
-- another when it ends, so its current status is its newest row.
WITH ordered AS (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY run_id
            ORDER BY ended_at DESC NULLS LAST, started_at DESC
        ) AS newest_first
    FROM runs
)

SELECT * EXCLUDE (newest_first)
FROM ordered
WHERE newest_first = 1
