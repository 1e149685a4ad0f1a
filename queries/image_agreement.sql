-- image_agreement: each image's neighbours, as knn_agreement.sql counted them.
--
-- One row per (layer, image): the per-image counts behind knn_agreement's figures, for maps
-- (points coloured by label, images whose neighbours disagree marked) and confusion matrices:
--   layer, image_id, label, pred (the model's class for the original), n (neighbours),
--   same_n (of them carrying the image's label), agreement = same_n / n, pred_agreement,
--   knn_label (the neighbours' majority vote, ties to the nearer, as knn_accuracy counts it)
-- Averaged over a layer's images, agreement is knn_agreement's agreement (scope 'all').
--
-- Reads knn_agreement.sql's per-image table (results_knn_agreement_images): in the DuckDB CLI,
-- after `.read RUN/catalog.sql`, `.read queries/knn_agreement.sql` first, with the same layer and
-- k; this file stops with an error that says so otherwise. featscope (`featscope query`, the
-- analyze stage) runs it first when needed.
--
-- Parameters (set any before the `.read`s):
--   layer  one knn layer; NULL (default) = every layer
--   k      neighbours per image, 1 .. the run's k; default = every neighbour the knn view lists
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;

SET VARIABLE image_agreement_inputs = CASE
    WHEN getvariable('knn_agreement_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k')}
    THEN error('image_agreement reads the results of knn_agreement.sql: .read queries/knn_agreement.sql first, with the same layer and k')
    ELSE true END;

SELECT layer, image_id, label, pred, n, same_n, same_n / n AS agreement, pred_n / n AS pred_agreement, knn_label
FROM results_knn_agreement_images
ORDER BY layer, image_id;
