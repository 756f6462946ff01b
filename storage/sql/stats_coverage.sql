-- Which statistics exist, per (checkpoint, calib_id): the calibration samples whose token rows
-- are stored (a sample counts once its stats_token rows are published; readers take each sample
-- from one part, tasks/statistics.py), against the samples the set records.
--   n_samples         distinct samples with token rows;
--   n_missing         samples of the set without them (a sweep collects exactly those);
--   n_duplicate_rows  token rows beyond one per (sample, layer, token): written twice by an older
--                     version or by two differently sharded sweeps at once; never read twice;
--   complete          no sample missing; NULL when the set itself is not recorded.
WITH per_set AS (
    SELECT
        checkpoint,
        calib_id,
        count(DISTINCT sample) AS n_samples,
        count(DISTINCT layer) AS n_layers,
        count(*) AS n_rows,
        count(*) - count(DISTINCT (sample, layer, token)) AS n_duplicate_rows
    FROM stats_token
    GROUP BY checkpoint, calib_id
),

calib AS (
    SELECT calib_id, n_samples AS n_expected, sample_ids
    FROM calibration_sets
    QUALIFY row_number() OVER (PARTITION BY calib_id ORDER BY created_at DESC) = 1
),

expected AS (
    SELECT calib_id, unnest(sample_ids) AS sample
    FROM calib
),

missing AS (
    SELECT per_set.checkpoint, per_set.calib_id, count(expected.sample) AS n_missing
    FROM per_set
    JOIN expected USING (calib_id)
    WHERE NOT EXISTS (
        SELECT 1 FROM stats_token AS t
        WHERE t.checkpoint = per_set.checkpoint AND t.calib_id = per_set.calib_id AND t.sample = expected.sample
    )
    GROUP BY per_set.checkpoint, per_set.calib_id
)

SELECT
    per_set.*,
    calib.n_expected,
    CASE WHEN calib.calib_id IS NULL THEN NULL ELSE coalesce(missing.n_missing, 0) END AS n_missing,
    CASE WHEN calib.calib_id IS NULL THEN NULL ELSE coalesce(missing.n_missing, 0) = 0 END AS complete
FROM per_set
LEFT JOIN calib USING (calib_id)
LEFT JOIN missing USING (checkpoint, calib_id)
