-- The Pareto front per (checkpoint, benchmark, eval_set, metric_name) over every method's
-- evaluated recipes (and the unpruned baseline), maximising both flops_reduction and metric,
-- from evaluation_summary (latest completed run per recipe and sample set). Rows with a NULL or
-- non-finite metric or flops_reduction are left out.
--
-- FLOPs reductions equal to three decimals (0.1 percentage point) are ties: recipes fitted to the
-- same budget measure 0.69883 and 0.69879, and a worse one must not join the front by that hair.
-- With level = round(flops_reduction, 3), a point is dominated iff another point has a level >= its
-- own and a metric >= its own, with > in one of them. So it is on the front iff its metric equals
-- the best at its level and exceeds the best at every greater level. Exact ties (same level, same
-- metric) all stay. Window form: O(n log n).
WITH points AS (
    SELECT *, round(flops_reduction, 3) AS level
    FROM evaluation_summary
    WHERE isfinite(metric) AND isfinite(flops_reduction)
),

levels AS (
    -- the best metric at each level
    SELECT checkpoint, benchmark, eval_set, metric_name, level, max(metric) AS best_here
    FROM points
    GROUP BY checkpoint, benchmark, eval_set, metric_name, level
),

levels_ahead AS (
    -- and the best metric at any strictly greater level (NULL for the greatest)
    SELECT
        *,
        max(best_here) OVER (
            PARTITION BY checkpoint, benchmark, eval_set, metric_name
            ORDER BY level DESC
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
        ) AS best_ahead
    FROM levels
)

SELECT points.* EXCLUDE (level)
FROM points
JOIN levels_ahead AS l
    ON l.checkpoint = points.checkpoint
    AND l.benchmark = points.benchmark
    AND l.eval_set IS NOT DISTINCT FROM points.eval_set
    AND l.metric_name = points.metric_name
    AND l.level = points.level
WHERE points.metric = l.best_here
  AND (l.best_ahead IS NULL OR points.metric > l.best_ahead)
