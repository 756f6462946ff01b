-- Every run's evaluations, one row per (run_id, checkpoint, benchmark, eval_set, metric_name,
-- recipe_id): the run's shards of that recipe on that sample set combined. The one aggregation
-- of the store: evaluation_summary, pareto, the CLI's table and the flow's artifacts read it.
--   status           the run's status (runs_latest): running (or killed), completed, failed,
--                    interrupted; NULL for rows of a run that wrote no runs row (older versions);
--   metric           mean per-sample score over the scored samples of all shards
--                    (sum of shard metric x scored samples / scored samples);
--   stderr           standard error of that mean from the per-sample scores in predictions:
--                    sqrt(sample variance (ddof 1) / n_scored), NULL below two scored samples
--                    (the same estimator as fitprune.evaluation.harness.score, for every metric);
--   flops_reduction  1 - sum of executed prefill FLOPs / sum of unpruned prefill FLOPs over the
--                    samples that ran (shard rows without prefill_flops_full: their mean
--                    reduction weighted by samples that ran);
--   flops_reduction_paper  the same under the authors' convention (visual tokens only, MACs;
--                    DESIGN §2), NULL when a shard did not record it (older rows); text tokens are
--                    never pruned, so every method removes a larger share of it than of the full count;
--   n_samples, n_scored, n_failed; n_shards; complete: the shards cover the sample set exactly;
--   eval set facts   source, split, n, seed of the sample set (calibration_sets), content hash;
--   recipe facts     budget, scoring, alpha, feasible, predicted and calibration-measured reduction,
--                    divergence (0 for the unpruned model), from the recipes row of the same run
--                    (else the recipe's latest row).
-- A shard written twice by one run (a retry under another write id) counts once: the latest row.
WITH shard_rows AS (
    SELECT *, n_samples - n_failed AS n_scored
    FROM evaluations
    QUALIFY row_number() OVER (
        PARTITION BY run_id, checkpoint, recipe_id, benchmark, eval_set, metric_name, shard
        ORDER BY created_at DESC
    ) = 1
),

sample_scores AS (
    SELECT
        run_id, recipe_id, benchmark, eval_set,
        count(score) AS n_scored_samples,
        stddev_samp(score) / sqrt(count(score)) AS stderr
    FROM predictions
    GROUP BY run_id, recipe_id, benchmark, eval_set
),

combined AS (
    SELECT
        run_id,
        checkpoint,
        benchmark,
        eval_set,
        metric_name,
        recipe_id,
        any_value(method) AS method,
        coalesce(sum(metric * n_scored) / nullif(sum(n_scored), 0), avg(metric)) AS metric,
        CASE
            WHEN bool_and(prefill_flops_full IS NOT NULL) AND sum(prefill_flops_full * n_scored) > 0
                THEN 1.0 - sum(prefill_flops * n_scored) / sum(prefill_flops_full * n_scored)
            ELSE coalesce(sum(flops_reduction * n_scored) / nullif(sum(n_scored), 0), avg(flops_reduction))
        END AS flops_reduction,
        CASE
            WHEN bool_and(prefill_flops_paper_full IS NOT NULL) AND sum(prefill_flops_paper_full * n_scored) > 0
                THEN 1.0 - sum(prefill_flops_paper * n_scored) / sum(prefill_flops_paper_full * n_scored)
        END AS flops_reduction_paper,
        coalesce(sum(prefill_flops * n_scored) / nullif(sum(n_scored), 0), avg(prefill_flops)) AS prefill_flops,
        sum(n_samples)::BIGINT AS n_samples,
        sum(n_scored)::BIGINT AS n_scored,
        sum(n_failed)::BIGINT AS n_failed,
        count(*) AS n_shards,
        sum(wall_s) AS wall_s,
        any_value(eval_content_hash) AS eval_content_hash,
        max(created_at) AS last_created_at
    FROM shard_rows
    GROUP BY run_id, checkpoint, benchmark, eval_set, metric_name, recipe_id
),

sample_sets AS (
    SELECT calib_id AS eval_set, content_hash, source AS eval_source, split AS eval_split,
           n_samples AS eval_n, seed AS eval_seed
    FROM calibration_sets
    QUALIFY row_number() OVER (PARTITION BY calib_id, content_hash ORDER BY created_at DESC) = 1
),

recipe_facts AS (
    -- the recipe's row from the run that evaluated it (a sweep fits what it evaluates), else its latest
    SELECT combined.run_id AS evaluated_by, recipes.*
    FROM combined
    JOIN recipes USING (recipe_id)
    QUALIFY row_number() OVER (
        PARTITION BY combined.run_id, recipes.recipe_id
        ORDER BY (recipes.run_id = combined.run_id) DESC, recipes.created_at DESC
    ) = 1
)

SELECT
    combined.* EXCLUDE (eval_content_hash),
    CASE WHEN sample_scores.n_scored_samples = combined.n_scored THEN sample_scores.stderr END AS stderr,
    runs_latest.status,
    runs_latest.ended_at AS run_ended_at,
    sample_sets.eval_source,
    sample_sets.eval_split,
    sample_sets.eval_n,
    sample_sets.eval_seed,
    combined.eval_content_hash,
    sample_sets.eval_n IS NOT NULL AND combined.n_samples = sample_sets.eval_n AS complete,
    recipe_facts.scoring,
    recipe_facts.budget,
    recipe_facts.alpha,
    recipe_facts.flops_convention,
    recipe_facts.feasible,
    recipe_facts.predicted_reduction,
    recipe_facts.measured_reduction AS calibration_reduction,
    CASE WHEN combined.recipe_id = 'none' THEN 0.0 ELSE recipe_facts.divergence END AS divergence,
    recipe_facts.divergence_calib_id
FROM combined
LEFT JOIN sample_scores
    ON sample_scores.run_id = combined.run_id
    AND sample_scores.recipe_id = combined.recipe_id
    AND sample_scores.benchmark = combined.benchmark
    AND sample_scores.eval_set IS NOT DISTINCT FROM combined.eval_set
LEFT JOIN runs_latest ON runs_latest.run_id = combined.run_id
LEFT JOIN sample_sets
    ON sample_sets.eval_set = combined.eval_set
    AND sample_sets.content_hash IS NOT DISTINCT FROM combined.eval_content_hash
LEFT JOIN recipe_facts
    ON recipe_facts.recipe_id = combined.recipe_id AND recipe_facts.evaluated_by = combined.run_id
