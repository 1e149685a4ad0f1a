-- knn_agreement: do an image's nearest neighbours share its class?
--
-- One row per (layer, scope): scope 'all', then one row per class (its label_name), for every
-- layer of the knn view (an index layer: one vector set x one metric, see the index_layers view).
--
--   n               images (kNN queries) in the scope
--   agreement       mean over the images of: the share of its k nearest neighbours (self
--                   excluded) that carry the image's label
--   pred_agreement  the same, against the image's predicted label
--   knn_accuracy    share of images whose k neighbours vote for the image's label: the label
--                   with most votes wins, a tie goes to the tied label that occurs nearest
--                   (smallest rank)
--   precision_at_1, r_precision, map_at_r
--                   as defined by Musgrave, Belongie & Lim 2020, "A metric learning reality
--                   check", sec. 3.2. R = number of other images with the query's label;
--                   r_precision = share of the R nearest that carry it; map_at_r = (1/R) x sum,
--                   over the positions i <= R that carry it, of precision@i. R reaches past the
--                   kNN graph's k, so these three come from knn_deep: the analyze stage's exact
--                   search, for every image (up to deep_queries images, default 20000) or else
--                   for a seeded sample of deep_queries images, each query down to its R or
--                   deep_k (default 1000), whichever is smaller; R is capped at that depth.
--                   Images alone in their class (R = 0) are left out, as in
--                   pytorch-metric-learning's AccuracyCalculator.
--   deep_n          the number of queries those three are averaged over (n: every image searched)
--
-- The figures are also kept, for this connection, as the temporary table results_knn_agreement
-- (the columns above plus label: NULL for 'all'), with the per-image figures as
-- results_knn_agreement_images (layer, image_id, label, pred, n neighbours, same_n and
-- same_rank_sum: how many carry the image's label and the sum of their ranks, pred_n: how many
-- carry its predicted label, knn_label: the vote's winner), the edges with their labels as
-- results_knn_agreement_edges (layer_no, query_id, rank, distance, label and pred of the query,
-- neighbor_label; layer_no numbers the layers of results_knn_agreement_layers(layer, layer_no)
-- in name order: an integer is cheaper than a name through 10M-row joins and groups), and the
-- parameters they were
-- computed with as the variable knn_agreement_params: class_distances.sql, suspicious.sql,
-- per_class.sql and layer_comparison.sql read them instead of computing them again (reading this
-- file again resets class_distances_params too: its pairs view reads the edges), so in the
-- CLI `.read` this file before those.
--
-- Parameters (set any before `.read`, e.g. SET VARIABLE layer = 'penultimate';):
--   layer  one knn layer; NULL (default) = every layer
--   k      neighbours per image, 1 .. the run's k; default = every neighbour the knn view lists
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;

-- the kept tables are replaced one after the other: until the last line says for which
-- parameters they hold, nothing may read them (dropped, a reader stops on the missing table
-- rather than read tables left by an earlier run of this file, should this one stop halfway)
SET VARIABLE knn_agreement_params = NULL;
SET VARIABLE class_distances_params = NULL;  -- its pairs view reads the edges below
DROP TABLE IF EXISTS results_knn_agreement_layers;
DROP TABLE IF EXISTS results_knn_agreement_edges;
DROP TABLE IF EXISTS results_knn_agreement_images;
DROP TABLE IF EXISTS results_knn_agreement;

-- the layers measured, numbered in name order
CREATE OR REPLACE TEMP TABLE results_knn_agreement_layers AS
SELECT layer, (row_number() OVER (ORDER BY layer))::INTEGER AS layer_no
FROM (SELECT DISTINCT layer FROM knn WHERE getvariable('layer') IS NULL OR layer = getvariable('layer'));

-- every edge with both labels (the query's label and prediction, the neighbour's label), kept
-- for this file's per-image counts and class_distances.sql (its kNN-scope distances). The
-- catalog's knn_labels view has them: the analyze stage's stored join (knn_labels/), or for a
-- run without it the join itself, made here once per connection
CREATE OR REPLACE TEMP TABLE results_knn_agreement_edges AS
SELECT l.layer_no, e.query_id, e.rank, e.distance, e.label, e.pred, e.neighbor_label
FROM knn_labels e
JOIN results_knn_agreement_layers l ON l.layer = e.layer
WHERE e.rank <= getvariable('k');

-- per image: its k neighbours' label counts, kept for this file's figures, class_distances.sql
-- (the kNN triplets) and suspicious.sql
CREATE OR REPLACE TEMP TABLE results_knn_agreement_images AS
WITH
edges AS (SELECT layer_no, query_id, rank, neighbor_label AS label FROM results_knn_agreement_edges),
-- n neighbours; same_n of them carry the image's label, at ranks summing to same_rank_sum;
-- pred_n carry its predicted label
counts AS MATERIALIZED (
    SELECT layer_no, query_id AS image_id, any_value(label) AS label, any_value(pred) AS pred,
        count(*) AS n,
        count(*) FILTER (WHERE neighbor_label = label) AS same_n,
        coalesce(sum(rank) FILTER (WHERE neighbor_label = label), 0) AS same_rank_sum,
        count(*) FILTER (WHERE neighbor_label = pred) AS pred_n
    FROM results_knn_agreement_edges
    GROUP BY layer_no, query_id
),
-- the vote: the label with most votes wins, of tied labels the nearest (votes times k + 1 minus
-- the nearest rank, 1 .. k, orders the labels by votes, then by nearness). An image whose own
-- label has more than half the votes wins it outright; only the others need every label's votes
-- (a grouping per (image, label) of their edges alone)
open_votes AS (
    SELECT layer_no, image_id, arg_max(label, votes * (getvariable('k') + 1) - nearest) AS knn_label
    FROM (
        SELECT e.layer_no, e.query_id AS image_id, e.label, count(*) AS votes, min(e.rank) AS nearest
        FROM edges e
        SEMI JOIN (SELECT layer_no, image_id FROM counts WHERE 2 * same_n <= n) o
            ON o.layer_no = e.layer_no AND o.image_id = e.query_id
        GROUP BY e.layer_no, e.query_id, e.label
    )
    GROUP BY layer_no, image_id
)
SELECT l.layer, c.* EXCLUDE (layer_no), CASE WHEN 2 * c.same_n > c.n THEN c.label ELSE v.knn_label END AS knn_label
FROM counts c
JOIN results_knn_agreement_layers l USING (layer_no)
LEFT JOIN open_votes v USING (layer_no, image_id);

-- the figures, kept for per_class.sql and layer_comparison.sql (see the top of this file)
CREATE OR REPLACE TEMP TABLE results_knn_agreement AS
WITH
labels AS NOT MATERIALIZED (SELECT image_id, label FROM images),
class_names AS (SELECT DISTINCT label, label_name FROM images),

-- agreement and pred_agreement: the share of the votes that go to the image's (predicted) label;
-- knn_correct: the vote's winner is the image's label
per_image AS (
    SELECT layer, label, same_n / n AS agreement, pred_n / n AS pred_agreement, knn_label = label AS knn_correct
    FROM results_knn_agreement_images
),

agreement AS (
    SELECT layer,
        label,  -- NULL for 'all'
        count(*) AS n,
        avg(agreement) AS agreement,
        avg(pred_agreement) AS pred_agreement,
        avg(knn_correct::INTEGER) AS knn_accuracy
    FROM per_image
    GROUP BY GROUPING SETS ((layer), (layer, label))
),

-- per searched query: knn_deep lists its R nearest (R capped at the search's depth), with hit
-- (the neighbour carries the query's label) and hits (the hits at this rank or nearer), stored by
-- the analyze stage; the j-th hit, at rank i, adds precision@i = j / i to MAP@R. Plain sums per
-- query; the labels join the ~10,000 per-query rows, not the 10M deep edges. (A query alone in
-- its class has R = 0 and no rows.)
deep_per_query AS (
    SELECT d.layer, d.query_id, l.label, d.precision_at_1, d.r_precision, d.map_at_r
    FROM (
        SELECT layer, query_id,
            (count(*) FILTER (WHERE hit AND rank = 1))::INTEGER AS precision_at_1,
            count(*) FILTER (WHERE hit) / count(*) AS r_precision,
            coalesce(sum(hits / rank) FILTER (WHERE hit), 0) / count(*) AS map_at_r
        FROM knn_deep
        WHERE getvariable('layer') IS NULL OR layer = getvariable('layer')
        GROUP BY layer, query_id
    ) d
    JOIN labels l ON l.image_id = d.query_id
),
musgrave AS (
    SELECT layer, label,
        avg(precision_at_1) AS precision_at_1,
        avg(r_precision) AS r_precision,
        avg(map_at_r) AS map_at_r,
        count(*) AS deep_n
    FROM deep_per_query
    GROUP BY GROUPING SETS ((layer), (layer, label))
)

SELECT a.layer, CASE WHEN a.label IS NULL THEN 'all' ELSE c.label_name END AS scope, a.label, a.n, a.agreement, a.pred_agreement, a.knn_accuracy,
    m.precision_at_1, m.r_precision, m.map_at_r, coalesce(m.deep_n, 0) AS deep_n
FROM agreement a
LEFT JOIN musgrave m ON m.layer = a.layer AND m.label IS NOT DISTINCT FROM a.label
LEFT JOIN class_names c ON c.label = a.label;
SET VARIABLE knn_agreement_params = {'layer': getvariable('layer'), 'k': getvariable('k')};

SELECT * EXCLUDE (label) FROM results_knn_agreement ORDER BY layer, label NULLS FIRST;
