-- explanation_continuity: do nearly equivalent inputs get nearly equivalent explanations, for each
-- explanation method the run stored (Montavon, Samek & Mueller 2018, sec. 7.1), and the
-- robustness scores Quantus computes, from the stored maps.
--
-- E(x) is the method's map of the original's predicted class for the original, E(x') for the view
-- (the same class), R the original's map carried by the view's own shift or rotation (the
-- equivariance correction: only change beyond the transformation counts; R = E for views that move
-- nothing), x and x' the model inputs (after normalisation), h the logits. Per (method, image, view)
-- (results_explanation_images; explanation_images.sql lists them):
--   continuity       ||E(x) - E(x')||_1 / ||x - x'||_2          (Montavon's ratio; 0 when both are 0)
--   continuity_eq    ||R - E(x')||_1 / ||x - x'||_2             (equivariance-corrected)
--   pearson, spearman, topk_iou (+ _eq against R): scale-free similarity of the two maps; topk_iou is
--                    the IoU of the explain_topk % most relevant cells (the `topk` column)
--   local_lipschitz  ||E(x) - E(x')||_2 / (||x - x'||_2 + 1e-10) (Quantus LocalLipschitzEstimate)
--   sensitivity      ||E(x) - E(x')||_2 / ||E(x)||_2           (Quantus Max-/AvgSensitivity, captum
--                                                               sensitivity_max; NULL when E(x) = 0)
--   ris, ros         ||(E(x) - E(x')) / E(x)||_2 over ||(x - x') / x||_2 and over ||h(x) - h(x')||_2
--                    (Agarwal et al. 2022's relative input / output stability, as Quantus computes
--                    them: e / (e + (e == 0) * 1e-6), a zero denominator read as 1e-6)
--   flipped          the predicted class changed (Quantus returns NaN for those; here they are kept
--                    and flagged: filter on it)
--
-- One row per (method, view), then one per method over every view (view = 'all'), where each image's
-- views are Quantus's perturbation samples: local_lipschitz, max_sensitivity, ris and ros are the
-- mean over images of the image's largest value, avg_sensitivity the mean of its mean (per view,
-- with one sample, max_sensitivity = avg_sensitivity). Every other figure is a mean over the rows.
-- continuity figures depend on each method's scale (compare a method with itself, across views or
-- runs); correlations, overlaps and sensitivities do not.
--
-- Parameters (set any before `.read`):
--   method  one explanation method (cam, gradcam, saliency, lrp); NULL (default) = every method
--   view    one view; NULL (default) = every view
SET VARIABLE method = coalesce(getvariable('method'), NULL)::VARCHAR;
SET VARIABLE view = coalesce(getvariable('view'), NULL)::VARCHAR;
SET VARIABLE explanation_continuity_params = NULL;

CREATE OR REPLACE TEMP TABLE results_explanation_images AS
SELECT e.method, e.image_id, e.view, i.label, i.label_name, e.geometric, p.input_dist,
    CASE WHEN p.input_dist > 0 THEN e.l1 / p.input_dist WHEN e.l1 = 0 THEN 0.0 END AS continuity,
    CASE WHEN p.input_dist > 0 THEN e.l1_eq / p.input_dist WHEN e.l1_eq = 0 THEN 0.0 END AS continuity_eq,
    e.pearson, e.pearson_eq, e.spearman, e.spearman_eq, e.topk_iou, e.topk_iou_eq, e.topk,
    e.l2 / (p.input_dist + 1e-10) AS local_lipschitz,
    CASE WHEN e.orig_l2 > 0 THEN e.l2 / e.orig_l2 END AS sensitivity,
    e.rel_l2 / CASE WHEN p.input_rel_dist = 0 THEN 1e-6 ELSE p.input_rel_dist END AS ris,
    e.rel_l2 / CASE WHEN p.logit_dist = 0 THEN 1e-6 ELSE p.logit_dist END AS ros,
    po.pred <> pv.pred AS flipped
FROM explanation_pairs e
JOIN perturbations p ON p.image_id = e.image_id AND p.view = e.view
JOIN images i ON i.image_id = e.image_id
JOIN predictions po ON po.image_id = e.image_id AND po.view = 'orig'
JOIN predictions pv ON pv.image_id = e.image_id AND pv.view = e.view
WHERE (getvariable('method') IS NULL OR e.method = getvariable('method'))
  AND (getvariable('view') IS NULL OR e.view = getvariable('view'));
SET VARIABLE explanation_continuity_params = {'method': getvariable('method'), 'view': getvariable('view')};

WITH
per_image AS (  -- each image's views as Quantus's perturbation samples
    SELECT method, image_id, max(sensitivity) AS max_sensitivity, avg(sensitivity) AS avg_sensitivity,
        max(local_lipschitz) AS local_lipschitz, max(ris) AS ris, max(ros) AS ros
    FROM results_explanation_images
    GROUP BY method, image_id
),
means AS (
    SELECT method, CASE WHEN grouping(view) = 1 THEN 'all' ELSE view END AS view,
        count(*) AS n, bool_or(geometric) AS geometric,
        avg(input_dist) AS input_dist_mean,
        avg(continuity) AS continuity_mean, max(continuity) AS continuity_max,
        avg(continuity_eq) AS continuity_eq_mean, max(continuity_eq) AS continuity_eq_max,
        avg(pearson) AS pearson_mean, avg(pearson_eq) AS pearson_eq_mean,
        avg(spearman) AS spearman_mean, avg(spearman_eq) AS spearman_eq_mean,
        avg(topk_iou) AS topk_iou_mean, avg(topk_iou_eq) AS topk_iou_eq_mean, max(topk) AS topk,
        avg(local_lipschitz) AS local_lipschitz, avg(sensitivity) AS sensitivity,
        avg(ris) AS ris, avg(ros) AS ros, avg(flipped::INTEGER) AS flip_rate
    FROM results_explanation_images
    GROUP BY GROUPING SETS ((method, view), (method))
),
over_views AS (
    SELECT method, 'all' AS view, avg(local_lipschitz) AS local_lipschitz, avg(max_sensitivity) AS max_sensitivity,
        avg(avg_sensitivity) AS avg_sensitivity, avg(ris) AS ris, avg(ros) AS ros
    FROM per_image
    GROUP BY method
)
SELECT m.method, m.view, m.n, m.geometric, m.input_dist_mean,
    m.continuity_mean, m.continuity_max, m.continuity_eq_mean, m.continuity_eq_max,
    m.pearson_mean, m.pearson_eq_mean, m.spearman_mean, m.spearman_eq_mean,
    m.topk_iou_mean, m.topk_iou_eq_mean, m.topk,
    coalesce(o.local_lipschitz, m.local_lipschitz) AS local_lipschitz,
    coalesce(o.max_sensitivity, m.sensitivity) AS max_sensitivity,
    coalesce(o.avg_sensitivity, m.sensitivity) AS avg_sensitivity,
    coalesce(o.ris, m.ris) AS ris, coalesce(o.ros, m.ros) AS ros, m.flip_rate
FROM means m
LEFT JOIN over_views o ON o.method = m.method AND m.view = 'all'
ORDER BY m.method, m.view <> 'all', m.view;
