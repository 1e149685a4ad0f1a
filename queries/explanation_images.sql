-- explanation_images: explanation_continuity.sql's figures for each (method, image, view), before
-- they are averaged: method, image_id, view, label, label_name, geometric, input_dist, continuity,
-- continuity_eq, pearson(_eq), spearman(_eq), topk_iou(_eq), topk, local_lipschitz, sensitivity,
-- ris, ros, flipped (the predicted class changed: Quantus would give NaN; here the value is kept).
--
-- Reads explanation_continuity.sql's per-image table (results_explanation_images): in the DuckDB
-- CLI, after `.read RUN/catalog.sql`, `.read queries/explanation_continuity.sql` first, with the
-- same method and view; this file stops with an error that says so otherwise.
--
-- Parameters (set any before the `.read`s):
--   method  one explanation method; NULL (default) = every method
--   view    one view; NULL (default) = every view
SET VARIABLE method = coalesce(getvariable('method'), NULL)::VARCHAR;
SET VARIABLE view = coalesce(getvariable('view'), NULL)::VARCHAR;

SET VARIABLE explanation_images_inputs = CASE
    WHEN getvariable('explanation_continuity_params') IS DISTINCT FROM {'method': getvariable('method'), 'view': getvariable('view')}
    THEN error('explanation_images reads the results of explanation_continuity.sql: .read queries/explanation_continuity.sql first, with the same method and view')
    ELSE true END;

SELECT method, image_id, view, label, label_name, geometric, input_dist, continuity, continuity_eq,
    pearson, pearson_eq, spearman, spearman_eq, topk_iou, topk_iou_eq, topk, local_lipschitz, sensitivity,
    ris, ros, flipped
FROM results_explanation_images
ORDER BY method, image_id, view;
