-- continuity_images: continuity.sql's figures for each image, before they are averaged.
--
-- One row per (layer, image, view) that continuity.sql measured (the twins view: every image, or
-- a seeded sample when the run is larger than continuity_queries):
--   layer, image_id, view, label, label_name, input_dist (||x - x'||_2), feature_dist,
--   lipschitz (feature_dist / input_dist), twin_rank, nearest_other_dist, continuous (the view
--   stays closer than the nearest image of another class), flipped (the predicted class
--   changes), cam_continuity (||CAM(x) - CAM(x')||_1 / ||x - x'||_2; NULL without CAMs)
-- Averaged per (layer, view), these are continuity.sql's scope 'all' figures.
--
-- Reads continuity.sql's per-image table (results_continuity_images): in the DuckDB CLI, after
-- `.read RUN/catalog.sql`, `.read queries/continuity.sql` first, with the same layer and view;
-- this file stops with an error that says so otherwise. featscope runs it first when needed.
--
-- Parameters (set any before the `.read`s):
--   layer  one knn layer; NULL (default) = every layer
--   view   one view; NULL (default) = every view
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE view = coalesce(getvariable('view'), NULL)::VARCHAR;

SET VARIABLE continuity_images_inputs = CASE
    WHEN getvariable('continuity_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'view': getvariable('view')}
    THEN error('continuity_images reads the results of continuity.sql: .read queries/continuity.sql first, with the same layer and view')
    ELSE true END;

SELECT layer, image_id, view, label, label_name, input_dist, feature_dist, lipschitz, twin_rank,
    nearest_other_dist, continuous, flipped, cam_continuity
FROM results_continuity_images
ORDER BY layer, image_id, view;
