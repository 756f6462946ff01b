-- Which statistics exist: per (checkpoint, calib_id), how many calibration samples and layers
-- stats_layer holds, against the size of the calibration set. complete is false while samples
-- are missing (a sweep recomputes only those) and NULL when the set itself is not recorded.
WITH per_set AS (
    SELECT
        checkpoint,
        calib_id,
        count(DISTINCT sample) AS n_samples,
        count(DISTINCT layer) AS n_layers,
        count(*) AS n_rows
    FROM stats_layer
    GROUP BY checkpoint, calib_id
),

calib AS (
    SELECT calib_id, n_samples AS n_expected
    FROM calibration_sets
    QUALIFY row_number() OVER (PARTITION BY calib_id ORDER BY created_at DESC) = 1
)

SELECT
    per_set.*,
    calib.n_expected,
    per_set.n_samples >= calib.n_expected AS complete
FROM per_set
LEFT JOIN calib USING (calib_id)
