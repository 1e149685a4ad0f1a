-- suspicious: images whose neighbours disagree with their label while the model is confident;
-- the candidates for mislabels (the model and the neighbours agree on another class) and for
-- shortcuts (the model predicts the label, but from features that sit among other classes).
--
-- One row per (layer, image), the `top` most suspicious images of each layer, most suspicious
-- first: images with prob >= min_prob whose agreement (share of the k neighbours carrying the
-- image's label) is at most max_agreement, ranked by suspicion = prob x (1 - agreement), ties
-- by image_id.
--   rank, image_id, uri, label_name, pred_name, prob, agreement, knn_label (the neighbours'
--   majority vote, ties to the nearer), suspicion, neighbor_labels and neighbor_ids (nearest first)
--
-- Reads knn_agreement.sql's per-image figures (results_knn_agreement_images): in the DuckDB CLI,
-- after `.read RUN/catalog.sql`, `.read queries/knn_agreement.sql` first, with the same layer and
-- k; this file stops with an error that says so otherwise. featscope (`featscope query`, the
-- analyze stage) runs it first when needed (queries/__init__.py).
--
-- Parameters (set any before `.read`):
--   layer          one knn layer; NULL (default) = every layer
--   k              neighbours per image, 1 .. the run's k; default = all the knn view lists
--   top            images per layer (default 20)
--   min_prob       the confidence an image needs (default 0.5)
--   max_agreement  the most agreement an image may have (default 0.5)
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE top = coalesce(getvariable('top'), 20)::INTEGER;
SET VARIABLE min_prob = coalesce(getvariable('min_prob'), 0.5)::DOUBLE;
SET VARIABLE max_agreement = coalesce(getvariable('max_agreement'), 0.5)::DOUBLE;

-- knn_agreement's per-image figures must be there, for this layer and k
SET VARIABLE suspicious_inputs = CASE
    WHEN getvariable('knn_agreement_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k')}
    THEN error('suspicious reads the results of knn_agreement.sql: .read queries/knn_agreement.sql first, with the same layer and k')
    ELSE true END;

WITH
labels AS NOT MATERIALIZED (SELECT image_id, label FROM images),
class_names AS (SELECT DISTINCT label, label_name FROM images),
-- the candidates from knn_agreement's per-image figures; the neighbour lists only for the top ones
candidates AS (
    SELECT i.layer, i.image_id, i.label, i.pred, p.prob, i.same_n / i.n AS agreement, i.knn_label
    FROM results_knn_agreement_images i
    JOIN predictions p ON p.image_id = i.image_id AND p.view = 'orig'
    WHERE p.prob >= getvariable('min_prob')
),
ranked AS (
    SELECT *, prob * (1 - agreement) AS suspicion,
        row_number() OVER (PARTITION BY layer ORDER BY prob * (1 - agreement) DESC, image_id) AS rank
    FROM candidates
    WHERE agreement <= getvariable('max_agreement')
    QUALIFY rank <= getvariable('top')
),
neighbours AS (
    SELECT e.layer, e.query_id AS image_id,
        list(c.label_name ORDER BY e.rank) AS neighbor_labels,
        list(e.neighbor_id ORDER BY e.rank) AS neighbor_ids
    FROM knn e
    JOIN ranked r ON r.layer = e.layer AND r.image_id = e.query_id
    JOIN labels nb ON nb.image_id = e.neighbor_id
    JOIN class_names c ON c.label = nb.label
    WHERE e.rank <= getvariable('k')
    GROUP BY e.layer, e.query_id
)

SELECT r.layer, r.rank, r.image_id, i.uri, i.label_name, coalesce(c.label_name, r.pred::VARCHAR) AS pred_name,
    r.prob, r.agreement, kc.label_name AS knn_label, r.suspicion,
    n.neighbor_labels, n.neighbor_ids
FROM ranked r
JOIN neighbours n USING (layer, image_id)
JOIN images i USING (image_id)
LEFT JOIN class_names c ON c.label = r.pred
LEFT JOIN class_names kc ON kc.label = r.knn_label
ORDER BY r.layer, r.rank;
