-- per_class: knn_agreement and class_distances, for each class.
--
-- Reads the results of the two measures it summarises, so nothing is computed twice: in the
-- DuckDB CLI, after `.read RUN/catalog.sql`, set any parameters, then
--     .read queries/knn_agreement.sql
--     .read queries/class_distances.sql
--     .read queries/per_class.sql
-- Those two files keep their figures as the temporary tables results_knn_agreement and
-- results_class_distances (with their per-class rows) and their parameters in the variables
-- knn_agreement_params and class_distances_params; this file stops with an error that says so
-- when they are missing or were computed with other parameters. featscope (`featscope query`,
-- the analyze stage) runs them first when needed (queries/__init__.py).
--
-- One row per (layer, class). A class's figures are those of the images (queries, anchors) of
-- that class; the definitions are those of knn_agreement.sql and class_distances.sql:
--   n, agreement, pred_agreement, knn_accuracy, precision_at_1, r_precision, map_at_r, deep_n
--   knn_* / global_*   pairs, same_mean, diff_mean, same_diff_ratio, auc, triplet_violation_rate
--                      of the pairs and triplets whose anchor is in the class: 'knn' = the kNN
--                      edges, 'global' = the seeded uniform sample (per class it holds about
--                      pairs x class share pairs: small classes get few)
--
-- Parameters (set any before the three `.read`s):
--   layer     one knn layer; NULL (default) = every layer
--   k         neighbours per image, 1 .. the run's k; default = every neighbour the knn view lists
--   seed      the sampling seed (default 0)
--   pairs     global pairs sampled (default 100000)
--   triplets  global triplets sampled (default 100000)
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE seed = coalesce(getvariable('seed'), 0)::BIGINT;
SET VARIABLE pairs = coalesce(getvariable('pairs'), 100000)::BIGINT;
SET VARIABLE triplets = coalesce(getvariable('triplets'), 100000)::BIGINT;

-- the two measures' results must be there, for these parameters
SET VARIABLE per_class_inputs = CASE
    WHEN getvariable('knn_agreement_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k')}
    THEN error('per_class reads the results of knn_agreement.sql: .read queries/knn_agreement.sql first, with the same layer and k')
    WHEN getvariable('class_distances_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k'),
        'seed': getvariable('seed'), 'pairs': getvariable('pairs'), 'triplets': getvariable('triplets')}
    THEN error('per_class reads the results of class_distances.sql: .read queries/class_distances.sql first, with the same parameters')
    ELSE true END;

WITH
-- one row per (layer, class): the two scopes of class_distances side by side
distances AS (
    SELECT layer, label,
        max(pairs) FILTER (WHERE scope = 'knn') AS knn_pairs,
        max(same_mean) FILTER (WHERE scope = 'knn') AS knn_same_mean,
        max(diff_mean) FILTER (WHERE scope = 'knn') AS knn_diff_mean,
        max(same_diff_ratio) FILTER (WHERE scope = 'knn') AS knn_same_diff_ratio,
        max(auc) FILTER (WHERE scope = 'knn') AS knn_auc,
        max(triplet_violation_rate) FILTER (WHERE scope = 'knn') AS knn_triplet_violation_rate,
        max(pairs) FILTER (WHERE scope = 'global') AS global_pairs,
        max(same_mean) FILTER (WHERE scope = 'global') AS global_same_mean,
        max(diff_mean) FILTER (WHERE scope = 'global') AS global_diff_mean,
        max(same_diff_ratio) FILTER (WHERE scope = 'global') AS global_same_diff_ratio,
        max(auc) FILTER (WHERE scope = 'global') AS global_auc,
        max(triplet_violation_rate) FILTER (WHERE scope = 'global') AS global_triplet_violation_rate
    FROM results_class_distances
    WHERE label IS NOT NULL
    GROUP BY layer, label
)

SELECT ag.layer, ag.scope AS class, ag.n, ag.agreement, ag.pred_agreement, ag.knn_accuracy,
    ag.precision_at_1, ag.r_precision, ag.map_at_r, ag.deep_n,
    d.knn_pairs, d.knn_same_mean, d.knn_diff_mean, d.knn_same_diff_ratio, d.knn_auc, d.knn_triplet_violation_rate,
    d.global_pairs, d.global_same_mean, d.global_diff_mean, d.global_same_diff_ratio, d.global_auc,
    d.global_triplet_violation_rate
FROM results_knn_agreement ag
LEFT JOIN distances d USING (layer, label)
WHERE ag.label IS NOT NULL
ORDER BY ag.layer, ag.label;
