-- The Pareto front per (checkpoint, benchmark, metric_name) over every method's evaluated
-- recipes (and the unpruned baseline), maximising both flops_reduction and metric, from
-- evaluation_summary (shards and repeats already combined). Rows with a NULL or non-finite
-- metric or flops_reduction are left out.
--
-- A point is dominated iff another has >= on both and > on at least one, i.e. iff
--   some point with strictly greater flops_reduction has metric >= its metric, or
--   some point with equal flops_reduction has a strictly greater metric.
-- So it is on the front iff its metric equals the best at its flops_reduction and exceeds the
-- best at every greater flops_reduction. Exact duplicates both stay. Window form: O(n log n);
-- the NOT EXISTS form is quadratic.
WITH points AS (
    SELECT *
    FROM evaluation_summary
    WHERE isfinite(metric) AND isfinite(flops_reduction)
),

levels AS (
    -- the best metric at each distinct flops_reduction
    SELECT checkpoint, benchmark, metric_name, flops_reduction, max(metric) AS best_here
    FROM points
    GROUP BY checkpoint, benchmark, metric_name, flops_reduction
),

levels_ahead AS (
    -- and the best metric at any strictly greater flops_reduction (NULL for the greatest)
    SELECT
        *,
        max(best_here) OVER (
            PARTITION BY checkpoint, benchmark, metric_name
            ORDER BY flops_reduction DESC
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
        ) AS best_ahead
    FROM levels
)

SELECT points.*
FROM points
JOIN levels_ahead USING (checkpoint, benchmark, metric_name, flops_reduction)
WHERE points.metric = levels_ahead.best_here
  AND (levels_ahead.best_ahead IS NULL OR points.metric > levels_ahead.best_ahead)
