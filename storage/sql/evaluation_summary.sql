-- One row per (checkpoint, benchmark, metric_name, recipe_id, method): the shards and repeated
-- runs of its evaluations combined.
--   metric           sample-weighted mean over shards (plain mean if no shard counted samples);
--   flops_reduction  mean over shards; prefill_flops likewise;
--   n_samples        samples evaluated over all shards and runs (repeats count again);
--   budget, alpha    from the recipe (NULL for the unpruned baseline, recipe_id 'none');
--   divergence       the recipe's KL against the unpruned model on its calibration set's held-out
--                    part (divergence_calib_id; NULL when not measured, 0 for the unpruned model).
-- A shard written twice by one run (a retry under a new write id) counts once: the latest row.
WITH shard_rows AS (
    SELECT *
    FROM evaluations
    QUALIFY row_number() OVER (
        PARTITION BY run_id, checkpoint, recipe_id, benchmark, metric_name, shard
        ORDER BY created_at DESC
    ) = 1
),

recipe_facts AS (
    SELECT recipe_id, scoring, budget, alpha, flops_convention, divergence, divergence_calib_id
    FROM recipes
    QUALIFY row_number() OVER (PARTITION BY recipe_id ORDER BY created_at DESC) = 1
),

combined AS (
    SELECT
        checkpoint,
        benchmark,
        metric_name,
        recipe_id,
        method,
        coalesce(sum(metric * n_samples) / nullif(sum(n_samples), 0), avg(metric)) AS metric,
        avg(flops_reduction) AS flops_reduction,
        avg(prefill_flops) AS prefill_flops,
        sum(n_samples)::BIGINT AS n_samples,
        sum(n_failed)::BIGINT AS n_failed,
        count(*) AS n_shards,
        count(DISTINCT run_id) AS n_runs,
        sum(wall_s) AS wall_s,
        max(created_at) AS last_created_at
    FROM shard_rows
    GROUP BY checkpoint, benchmark, metric_name, recipe_id, method
)

SELECT
    combined.*,
    recipe_facts.scoring,
    recipe_facts.budget,
    recipe_facts.alpha,
    recipe_facts.flops_convention,
    CASE WHEN combined.recipe_id = 'none' THEN 0.0 ELSE recipe_facts.divergence END AS divergence,
    recipe_facts.divergence_calib_id
FROM combined
LEFT JOIN recipe_facts USING (recipe_id)
