-- layer_comparison: which feature-map distance explains the network best?
--
-- One row per knn layer: each vector set (layer alias x pooling: gap, flat, cam; penultimate) x
-- each metric (l2, cosine) the run indexed, with its headline figures side by side. The
-- definitions are those of knn_agreement.sql (scope 'all') and class_distances.sql:
--   layer, features, pooling, metric, dim   what the row measures (the index_layers view)
--   n, agreement, pred_agreement, knn_accuracy, precision_at_1, r_precision, map_at_r, deep_n
--   knn_* / global_*   pairs, same_mean, diff_mean, same_diff_ratio, auc, triplet_violation_rate
--                      of the kNN edges ('knn') and of the seeded uniform sample ('global')
--   continuity_accuracy, lipschitz_mean, twin_rank_mean
--                      continuity.sql's figures averaged over every perturbed view of the run
--                      (NULL when the run made no views; per view: continuity.sql)
--   kind               'features' for the rows above; 'explanation' for one row per explanation method
--                      the run stored (layer 'explain:<method>'), whose kNN and distance columns are
--                      NULL and whose explanation_* columns are explanation_continuity.sql's over
--                      every view: continuity_mean, continuity_eq_mean (equivariance-corrected),
--                      spearman_eq_mean, topk_iou_eq_mean, sensitivity_mean (||E - E'|| / ||E||)
-- Feature rows come first, then explanation rows, best first by spearman_eq_mean (the
-- continuity ratios depend on each method's scale; the rank correlation does not).
-- Feature rows are ordered best first by map_at_r, then agreement: higher is better for agreement,
-- knn_accuracy, precision_at_1, r_precision, map_at_r and auc; lower for same_diff_ratio and
-- triplet_violation_rate. Distances of different metrics are not comparable with each other;
-- the ranks, AUCs and rates are.
--
-- Reads the results of knn_agreement.sql and class_distances.sql, so nothing is computed twice:
-- in the DuckDB CLI, after `.read RUN/catalog.sql`, set any parameters (but not layer), then
--     .read queries/knn_agreement.sql
--     .read queries/class_distances.sql
--     .read queries/layer_comparison.sql
-- Those two files keep their figures as the temporary tables results_knn_agreement and
-- results_class_distances and their parameters in knn_agreement_params and
-- class_distances_params; this file stops with an error that says so when they are missing or
-- were computed with other parameters (or for one layer). featscope (`featscope query`, the
-- analyze stage) runs them first when needed (queries/__init__.py).
--
-- Parameters (set any before the three `.read`s):
--   k         neighbours per image, 1 .. the run's k; default = every neighbour the knn view lists
--   seed      the sampling seed (default 0)
--   pairs     global pairs sampled (default 100000)
--   triplets  global triplets sampled (default 100000)
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE seed = coalesce(getvariable('seed'), 0)::BIGINT;
SET VARIABLE pairs = coalesce(getvariable('pairs'), 100000)::BIGINT;
SET VARIABLE triplets = coalesce(getvariable('triplets'), 100000)::BIGINT;

-- the two measures' results must be there, for every layer and these parameters
SET VARIABLE layer_comparison_inputs = CASE
    WHEN getvariable('knn_agreement_params') IS DISTINCT FROM {'layer': NULL::VARCHAR, 'k': getvariable('k')}
    THEN error('layer_comparison reads the results of knn_agreement.sql: .read queries/knn_agreement.sql first, with the same k and no layer set')
    WHEN getvariable('class_distances_params') IS DISTINCT FROM {'layer': NULL::VARCHAR, 'k': getvariable('k'),
        'seed': getvariable('seed'), 'pairs': getvariable('pairs'), 'triplets': getvariable('triplets')}
    THEN error('layer_comparison reads the results of class_distances.sql: .read queries/class_distances.sql first, with the same parameters and no layer set')
    ELSE true END;

WITH
-- one row per layer: the two scopes of class_distances side by side
distances AS (
    SELECT layer,
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
    WHERE label IS NULL
    GROUP BY layer
),

-- one row per layer: continuity under perturbation, over all its (image, view) pairs
continuity AS (
    SELECT t.layer,
        avg((t.feature_dist < t.nearest_other_dist)::INTEGER) AS continuity_accuracy,
        avg(CASE WHEN p.input_dist > 0 THEN t.feature_dist / p.input_dist
                 WHEN t.feature_dist = 0 THEN 0.0 END) AS lipschitz_mean,
        avg(t.twin_rank) AS twin_rank_mean
    FROM twins t
    JOIN perturbations p ON p.image_id = t.image_id AND p.view = t.view
    GROUP BY t.layer
),

-- one row per explanation method, over every (image, view) pair of its maps
explanation_figures AS (
    SELECT e.method,
        count(*) AS n,
        avg(CASE WHEN p.input_dist > 0 THEN e.l1 / p.input_dist WHEN e.l1 = 0 THEN 0.0 END) AS explanation_continuity_mean,
        avg(CASE WHEN p.input_dist > 0 THEN e.l1_eq / p.input_dist WHEN e.l1_eq = 0 THEN 0.0 END) AS explanation_continuity_eq_mean,
        avg(e.spearman_eq) AS explanation_spearman_eq_mean,
        avg(e.topk_iou_eq) AS explanation_topk_iou_eq_mean,
        avg(CASE WHEN e.orig_l2 > 0 THEN e.l2 / e.orig_l2 END) AS explanation_sensitivity_mean
    FROM explanation_pairs e
    JOIN perturbations p ON p.image_id = e.image_id AND p.view = e.view
    GROUP BY e.method
)

SELECT ag.layer, il.features, il.pooling, il.metric, il.dim,
    ag.n, ag.agreement, ag.pred_agreement, ag.knn_accuracy,
    ag.precision_at_1, ag.r_precision, ag.map_at_r, ag.deep_n,
    d.knn_pairs, d.knn_same_mean, d.knn_diff_mean, d.knn_same_diff_ratio, d.knn_auc, d.knn_triplet_violation_rate,
    d.global_pairs, d.global_same_mean, d.global_diff_mean, d.global_same_diff_ratio, d.global_auc,
    d.global_triplet_violation_rate,
    c.continuity_accuracy, c.lipschitz_mean, c.twin_rank_mean,
    NULL::DOUBLE AS explanation_continuity_mean, NULL::DOUBLE AS explanation_continuity_eq_mean,
    NULL::DOUBLE AS explanation_spearman_eq_mean, NULL::DOUBLE AS explanation_topk_iou_eq_mean,
    NULL::DOUBLE AS explanation_sensitivity_mean, 'features' AS kind
FROM results_knn_agreement ag
LEFT JOIN index_layers il USING (layer)
LEFT JOIN distances d USING (layer)
LEFT JOIN continuity c USING (layer)
WHERE ag.label IS NULL
UNION ALL BY NAME
SELECT 'explanation' AS kind, 'explain:' || method AS layer, method AS features, n,
    explanation_continuity_mean, explanation_continuity_eq_mean, explanation_spearman_eq_mean,
    explanation_topk_iou_eq_mean, explanation_sensitivity_mean
FROM explanation_figures
ORDER BY kind = 'explanation', map_at_r DESC NULLS LAST, agreement DESC, explanation_spearman_eq_mean DESC NULLS LAST, layer;
