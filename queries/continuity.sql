-- continuity: do nearly equivalent inputs get nearly equivalent features and explanations?
-- (Montavon, Samek & Mueller 2018, "Methods for interpreting and understanding deep neural
-- networks", sec. 7.1: explanation continuity.)
--
-- One row per (layer, view, scope): scope 'all', then one row per class (label_name). A view is
-- a perturbation made during extraction (`noise:0.05`, `shift:2`, ...); x is the image in the
-- model's input space (after normalisation), x' its perturbed view, f the layer's vector.
--
--   n                    images measured (the twins view: all images, or a seeded sample when the
--                        run is larger than continuity_queries)
--   input_dist_mean      mean ||x - x'||_2
--   feature_dist_mean    mean d(f(x), f(x')) in the layer's metric (l2: Euclidean; cosine: 1 - cos)
--   lipschitz_*          the local Lipschitz estimate d(f(x), f(x')) / ||x - x'||_2: mean, p95, max
--                        (0 when both distances are 0, as for a view of strength 0)
--   twin_rank_mean       mean rank f(x') would take among f(x)'s neighbours in the original
--                        index (1 = nearer than every other image)
--   continuity_accuracy  share of images whose view stays closer to f(x) than x's nearest
--                        image of another class
--   flip_rate            share of images whose predicted class changes
--   cam_continuity_*     ||CAM(x) - CAM(x')||_1 / ||x - x'||_2, mean and max, with both CAMs
--                        taken for the original's predicted class (NULL without a GAP+linear head)
--
-- The per-image figures stay, for this connection, as the temporary table
-- results_continuity_images (and the parameters as continuity_params): continuity_images.sql
-- lists them.
--
-- Parameters (set any before `.read`, e.g. SET VARIABLE layer = 'penultimate';):
--   layer  one knn layer; NULL (default) = every layer
--   view   one view; NULL (default) = every view
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE view = coalesce(getvariable('view'), NULL)::VARCHAR;
SET VARIABLE continuity_params = NULL;

-- one row per (layer, image, view), kept for this connection: continuity_images.sql lists it
CREATE OR REPLACE TEMP TABLE results_continuity_images AS
WITH
measured AS (
    SELECT t.layer, t.image_id, t.view, t.feature_dist, t.twin_rank, t.nearest_other_dist,
        p.input_dist, i.label, i.label_name,
        po.pred <> pv.pred AS flipped
    FROM twins t
    JOIN perturbations p ON p.image_id = t.image_id AND p.view = t.view
    JOIN images i ON i.image_id = t.image_id
    JOIN predictions po ON po.image_id = t.image_id AND po.view = 'orig'
    JOIN predictions pv ON pv.image_id = t.image_id AND pv.view = t.view
    WHERE (getvariable('layer') IS NULL OR t.layer = getvariable('layer'))
      AND (getvariable('view') IS NULL OR t.view = getvariable('view'))
),

-- ||CAM(x) - CAM(x')||_1 per (image, view); the CAM does not depend on the layer
cam_change AS (
    SELECT v.image_id, v.view,
        list_sum(list_transform(list_zip(o.cam, v.cam), lambda d: abs(d[1] - d[2]))) AS cam_l1
    FROM cams v
    JOIN cams o ON o.image_id = v.image_id AND o.view = 'orig'
    WHERE v.view <> 'orig'
),

per_image AS (
    SELECT m.*,
        CASE WHEN m.input_dist > 0 THEN m.feature_dist / m.input_dist
             WHEN m.feature_dist = 0 THEN 0.0 END AS lipschitz,
        CASE WHEN m.input_dist > 0 THEN c.cam_l1 / m.input_dist
             WHEN c.cam_l1 = 0 THEN 0.0 END AS cam_continuity,
        m.feature_dist < m.nearest_other_dist AS continuous
    FROM measured m
    LEFT JOIN cam_change c ON c.image_id = m.image_id AND c.view = m.view
)
SELECT * FROM per_image;
SET VARIABLE continuity_params = {'layer': getvariable('layer'), 'view': getvariable('view')};

SELECT layer, view,
    CASE WHEN grouping(label_name) = 1 THEN 'all' ELSE label_name END AS scope,
    count(*) AS n,
    avg(input_dist) AS input_dist_mean,
    avg(feature_dist) AS feature_dist_mean,
    avg(lipschitz) AS lipschitz_mean,
    quantile_cont(lipschitz, 0.95) AS lipschitz_p95,
    max(lipschitz) AS lipschitz_max,
    avg(twin_rank) AS twin_rank_mean,
    avg(continuous::INTEGER) AS continuity_accuracy,
    avg(flipped::INTEGER) AS flip_rate,
    avg(cam_continuity) AS cam_continuity_mean,
    max(cam_continuity) AS cam_continuity_max
FROM results_continuity_images
GROUP BY GROUPING SETS ((layer, view), (layer, view, label, label_name))
ORDER BY layer, view, grouping(label_name) DESC, min(label), scope;
