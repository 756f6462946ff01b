-- The latest fitted recipe per (checkpoint, method, scoring, flops_convention, budget): what a
-- sweep would apply now. n_fits counts the fits of that key (a refit appends a new row).
WITH keyed AS (
    SELECT
        *,
        count(*) OVER (PARTITION BY checkpoint, method, scoring, flops_convention, budget) AS n_fits,
        row_number() OVER (
            PARTITION BY checkpoint, method, scoring, flops_convention, budget
            ORDER BY created_at DESC, recipe_id DESC
        ) AS newest_first
    FROM recipes
)

SELECT * EXCLUDE (newest_first)
FROM keyed
WHERE newest_first = 1
