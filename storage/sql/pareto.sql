-- The Pareto front per (checkpoint, benchmark, eval_set, metric_name) over every method's
-- evaluated recipes (and the unpruned baseline), maximising both flops_reduction and metric,
-- from evaluation_summary (latest completed run per recipe and sample set). Rows with a NULL or
-- non-finite metric or flops_reduction are left out.
--
-- FLOPs reductions within 0.001 (0.1 percentage point) of each other are ties: recipes fitted to
-- the same budget measure 0.4994 and 0.5001, and a worse one must not join the front by that hair.
-- A point p is dominated iff some point q of its group
--   (a) has q.flops_reduction >= p.flops_reduction - 0.001 (as good, up to a tie) and q.metric > p.metric, or
--   (b) has q.flops_reduction >= p.flops_reduction + 0.001 (clearly better) and q.metric >= p.metric.
-- Points tied on both stay together. Two windows over the group ordered by flops_reduction
-- (RANGE frames): O(n log n).
WITH points AS (
    SELECT *
    FROM evaluation_summary
    WHERE isfinite(metric) AND isfinite(flops_reduction)
),

bounds AS (
    SELECT
        *,
        max(metric) OVER (
            PARTITION BY checkpoint, benchmark, eval_set, metric_name
            ORDER BY flops_reduction
            RANGE BETWEEN 0.001 PRECEDING AND UNBOUNDED FOLLOWING
        ) AS best_from_tie,     -- (a): includes p itself
        max(metric) OVER (
            PARTITION BY checkpoint, benchmark, eval_set, metric_name
            ORDER BY flops_reduction
            RANGE BETWEEN 0.001 FOLLOWING AND UNBOUNDED FOLLOWING
        ) AS best_beyond_tie    -- (b): NULL when no point is clearly better in FLOPs
    FROM points
)

SELECT * EXCLUDE (best_from_tie, best_beyond_tie)
FROM bounds
WHERE metric >= best_from_tie
  AND (best_beyond_tie IS NULL OR metric > best_beyond_tie)
