-- class_distances: are same-class images closer than different-class images?
--
-- One row per (layer, scope), for every layer of the knn view:
--   scope 'knn'     every (query, neighbour) edge exactly as the knn view lists it (rank <= k),
--                   with the distance it lists
--   scope 'global'  a seeded uniform sample of `pairs` ordered pairs of distinct images (drawn
--                   with replacement), distances computed here in the layer's metric: l2 =
--                   list_distance (Euclidean, = array_distance), cosine = list_cosine_distance
--                   (1 - cosine similarity); the same pairs for every layer
--
--   pairs                  pairs measured (same_n + diff_n)
--   same_* / diff_*        count, mean, sample std and 5th/50th/95th percentiles (linear
--                          interpolation) of the distances of same-class / different-class pairs
--   same_diff_ratio        same_mean / diff_mean (below 1: classes are tighter than the whole)
--   auc                    ROC-AUC of -distance as a score for "same class": the chance that a random
--                          same-class pair is closer than a random different-class pair, ties count 1/2
--   triplet_violation_rate share of (anchor, positive, negative) triplets with d(a,p) >= d(a,n):
--                          'knn': every triplet within one query's neighbour list (a = the query, p
--                          and n two of its neighbours; their rank decides, so of two neighbours at
--                          exactly the same distance the one ranked first counts as nearer);
--                          'global': `triplets` seeded triplets, a
--                          uniform over the images, p uniform over the other images of a's class, n
--                          uniform over the images of other classes
--   triplets               the triplets behind triplet_violation_rate
--
-- Sampling: the images with features are numbered 0..N-1 in (label, image_id) order; draw i uses
-- hash(i, seed, '<role>') modulo the range it picks from, so a seed gives the same sample on every
-- run and machine of one DuckDB version.
--
-- The kNN-scope pairs come from knn_agreement.sql's labelled edges (results_knn_agreement_edges)
-- and the kNN triplets from its per-image table (results_knn_agreement_images), so in the DuckDB
-- CLI, after `.read RUN/catalog.sql`:
--     .read queries/knn_agreement.sql
--     .read queries/class_distances.sql
-- with the same layer and k; this file stops with an error that says so otherwise. featscope
-- (`featscope query`, the analyze stage) runs it first when needed (queries/__init__.py).
--
-- The figures are also kept, for this connection, as the temporary table results_class_distances
-- with a label column: NULL for the rows above, and one row per (layer, scope, class of the
-- anchor) with the same figures over the pairs and triplets that class anchors (percentiles
-- NULL there), and the parameters as the variable class_distances_params: per_class.sql and
-- layer_comparison.sql read them instead of computing them again, so in the CLI `.read` this
-- file before those. The pairs themselves (blk, label of the anchor, distance, same) stay as the view
-- results_class_distances_pairs, blk numbering the (layer, scope) blocks of
-- results_class_distances_blocks: distance_histogram.sql bins them. The view reads
-- knn_agreement.sql's edges, so reading knn_agreement.sql again forgets these figures too
-- (class_distances_params is reset): .read this file again after it.
--
-- Parameters (set any before `.read`, e.g. SET VARIABLE pairs = 1000000;):
--   layer     one knn layer; NULL (default) = every layer
--   k         neighbours per image for scope 'knn', 1 .. the run's k; default = all the knn view lists
--   seed      the sampling seed (default 0)
--   pairs     global pairs sampled (default 100000)
--   triplets  global triplets sampled (default 100000)
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE seed = coalesce(getvariable('seed'), 0)::BIGINT;
SET VARIABLE pairs = coalesce(getvariable('pairs'), 100000)::BIGINT;
SET VARIABLE triplets = coalesce(getvariable('triplets'), 100000)::BIGINT;
SET VARIABLE class_distances_params = NULL;  -- until the figures below are there
DROP TABLE IF EXISTS results_class_distances;
DROP VIEW IF EXISTS results_class_distances_pairs;
DROP TABLE IF EXISTS results_class_distances_global;

-- knn_agreement's edges and per-image counts must be there, for this layer and k
SET VARIABLE class_distances_inputs = CASE
    WHEN getvariable('knn_agreement_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k')}
    THEN error('class_distances reads the results of knn_agreement.sql: .read queries/knn_agreement.sql first, with the same layer and k')
    ELSE true END;

-- (layer, scope) numbered in that order, from knn_agreement's layer numbers: the sorts below are
-- far faster on an integer than on two strings, and the kNN edges carry their layer's number
CREATE OR REPLACE TEMP TABLE results_class_distances_blocks AS
SELECT k.layer, i.features, i.metric, s.scope, (2 * k.layer_no - s.first)::INTEGER AS blk
FROM results_knn_agreement_layers k
JOIN index_layers i ON i.layer = k.layer
CROSS JOIN (VALUES ('global', 1), ('knn', 0)) s(scope, first);

-- the images with features, numbered in (label, image_id) order: a class is one block of numbers.
-- A class starts where the smaller labels end (a running sum over the classes' sizes); within it
-- the images are numbered by one window partitioned by class (cheaper than a sort of every image)
CREATE OR REPLACE TEMP TABLE class_distances_numbered AS
WITH
members AS MATERIALIZED (
    SELECT image_id, label FROM predictions JOIN (SELECT image_id, label FROM images) USING (image_id)
    WHERE view = 'orig'
),
classes AS (
    SELECT label, class_size, (sum(class_size) OVER (ORDER BY label) - class_size)::BIGINT AS class_start,
        (sum(class_size) OVER ())::BIGINT AS n
    FROM (SELECT label, count(*) AS class_size FROM members GROUP BY label)
)
SELECT m.image_id, m.label,
    (c.class_start + row_number() OVER (PARTITION BY m.label ORDER BY m.image_id) - 1)::BIGINT AS idx,
    c.class_start, c.class_size, c.n
FROM members m JOIN classes c ON c.label IS NOT DISTINCT FROM m.label;

-- the numbering of (blk, label) in class_ranks below: an INTEGER while blocks x classes stay under 2^31
SET VARIABLE class_distances_labels = (SELECT coalesce(max(label), -1) + 2 FROM images)::BIGINT;
SET VARIABLE class_distances_labels = CASE
    WHEN (SELECT max(blk) + 1 FROM results_class_distances_blocks)::BIGINT * getvariable('class_distances_labels')::BIGINT >= 2147483648
    THEN error('class_distances: too many classes x layers to number (blocks x classes must stay under 2^31)')
    ELSE getvariable('class_distances_labels') END;

-- each measured layer's vectors of the originals, in its metric
CREATE OR REPLACE TEMP VIEW class_distances_vectors AS
SELECT l.layer, l.metric, v.image_id, v.vec
FROM (SELECT DISTINCT layer, features, metric FROM results_class_distances_blocks) l
JOIN embeddings v ON v.layer = l.features AND v.view = 'orig';

-- scope global: pair i = (a, b), a uniform, b uniform over the others; their distances in
-- every measured layer, with the class of a
CREATE OR REPLACE TEMP TABLE results_class_distances_global AS
WITH
total AS (SELECT any_value(n) AS n FROM class_distances_numbered),
pair_draws AS (
    SELECT a, b + (b >= a)::BIGINT AS b   -- b skips a
    FROM (
        SELECT (hash(i, getvariable('seed'), 'pair-a') % n)::BIGINT AS a,
               (hash(i, getvariable('seed'), 'pair-b') % (n - 1))::BIGINT AS b
        FROM range(getvariable('pairs')) r(i), total
        WHERE n > 1
    )
),
-- the sampled pairs as image ids, computed once (MATERIALIZED keeps the planner from joining
-- the vectors first), then their distances in every measured layer
pair_ids AS MATERIALIZED (
    SELECT pa.image_id AS anchor, pb.image_id AS other, pa.label, pa.label = pb.label AS same
    FROM pair_draws d
    JOIN class_distances_numbered pa ON pa.idx = d.a
    JOIN class_distances_numbered pb ON pb.idx = d.b
),
global_pairs AS (
    SELECT va.layer, p.label, p.same,
        CASE va.metric WHEN 'cosine' THEN list_cosine_distance(va.vec, vb.vec)
                       ELSE list_distance(va.vec, vb.vec) END AS distance
    FROM pair_ids p
    JOIN class_distances_vectors va ON va.image_id = p.anchor
    JOIN class_distances_vectors vb ON vb.image_id = p.other AND vb.layer = va.layer
)
SELECT b.blk, p.label, p.distance, p.same
FROM global_pairs p JOIN results_class_distances_blocks b ON b.layer = p.layer AND b.scope = 'global';

-- every pair measured (blk, the class of its anchor: the query, or the sampled pair's first
-- image, distance, same), for this connection (the figures below, and distance_histogram.sql:
-- the histograms and the ROC curve behind the AUC). Scope knn: every edge of knn_agreement.sql's
-- results_knn_agreement_edges, read where it lies (a copy of the 10M edges cost more than the
-- windows below gain from reading a table; knn_agreement.sql resets class_distances_params
-- when it replaces them)
CREATE OR REPLACE TEMP VIEW results_class_distances_pairs AS
SELECT (2 * layer_no)::INTEGER AS blk, label, distance, label = neighbor_label AS same FROM results_knn_agreement_edges
UNION ALL
SELECT blk, label, distance, same FROM results_class_distances_global;

-- the figures, kept for per_class.sql and layer_comparison.sql (see the top of this file)
CREATE OR REPLACE TEMP TABLE results_class_distances AS
WITH
numbered AS (SELECT * FROM class_distances_numbered),
total AS (SELECT any_value(n) AS n FROM numbered),
layer_vectors AS NOT MATERIALIZED (SELECT * FROM class_distances_vectors),  -- streamed through each join: a copy would hold every vector
all_pairs AS NOT MATERIALIZED (SELECT * FROM results_class_distances_pairs),  -- read four times, through the view: no copy
blocks AS (SELECT layer, scope, blk FROM results_class_distances_blocks),

-- ROC-AUC by Mann-Whitney: with the pairs of a block sorted by distance, a pair's average rank
-- (ties share the mean of their positions) counted from the farthest is N - (lt + le - 1) / 2,
-- lt = rank() - 1 the pairs strictly nearer, le = count(*) the pairs as near or nearer. The
-- same pairs' ranks sum to U + npos (npos + 1) / 2, U = the (same, different) pairs where the
-- same pair is nearer, ties counting 1/2; so 2U = npos (2N + 1 - npos) - sum(rank() + count(*))
-- over the same pairs. Integer sums until the last division. One sort per block for the
-- (layer, scope) figures, one per class for the per-class figures.
-- count(*) with its peers is the slow part (~20% of a window), so the same sum comes from one
-- sort by (distance, same), different pairs first among equal distances: rank() by distance
-- alone, rank() and row_number() by (distance, same) share it. In a group of t equal distances
-- from position f, with d different pairs then s same pairs, the same pairs have rank() = f,
-- rank() by (distance, same) = f + d and row_number() = f + d + j, j = 0 .. s - 1; summed,
-- f - (f + d) + 2 (f + d + j) gives s (2f + d) + s (s - 1), as rank() + count(*) = f + (f + t - 1)
-- does.
-- The rank sums come from two windows, each over only the columns it needs and summed apart
-- (as fast as one statement carrying every pair through both windows, measured; easier to read).
scope_ranks AS (
    SELECT blk, sum(ranks) FILTER (WHERE same) AS same_ranks
    FROM (SELECT blk, same, rank() OVER by_distance - rank() OVER by_distance_same + 2 * row_number() OVER by_distance_same AS ranks
          FROM all_pairs
          WINDOW by_distance AS (PARTITION BY blk ORDER BY distance),
                 by_distance_same AS (PARTITION BY blk ORDER BY distance, same))
    GROUP BY blk
),
-- Per class the same sort trick, partitioned by one INTEGER that numbers (blk, label) as
-- blk * labels + label + 1 (0 for NULL; labels = the largest label + 2): ~20% faster than
-- partitioning by the two columns, ~15% faster than a BIGINT packing (measured).
class_ranks AS (
    SELECT cls // getvariable('class_distances_labels') AS blk,
        nullif(cls % getvariable('class_distances_labels'), 0) - 1 AS label,
        same_ranks
    FROM (SELECT cls, sum(ranks) FILTER (WHERE same) AS same_ranks
          FROM (SELECT cls, same, rank() OVER by_class - rank() OVER by_class_same + 2 * row_number() OVER by_class_same AS ranks
                FROM (SELECT (blk * getvariable('class_distances_labels') + coalesce(label + 1, 0))::INTEGER AS cls, distance, same
                      FROM all_pairs)
                WINDOW by_class AS (PARTITION BY cls ORDER BY distance),
                       by_class_same AS (PARTITION BY cls ORDER BY distance, same))
          GROUP BY cls)
),
-- the figures of each (layer, scope), label NULL, and of each class of anchors in it
stats AS (
    SELECT s.*, CASE WHEN s.whole THEN sr.same_ranks ELSE cr.same_ranks END AS same_ranks
    FROM (
        SELECT blk, label, grouping(label) = 1 AS whole, count(*) AS pairs,
            count(*) FILTER (WHERE same) AS same_n,
            avg(distance) FILTER (WHERE same) AS same_mean,
            stddev_samp(distance) FILTER (WHERE same) AS same_std,
            count(*) FILTER (WHERE NOT same) AS diff_n,
            avg(distance) FILTER (WHERE NOT same) AS diff_mean,
            stddev_samp(distance) FILTER (WHERE NOT same) AS diff_std
        FROM all_pairs
        GROUP BY GROUPING SETS ((blk), (blk, label))
    ) s
    LEFT JOIN scope_ranks sr ON s.whole AND sr.blk = s.blk
    LEFT JOIN class_ranks cr ON NOT s.whole AND cr.blk = s.blk AND cr.label IS NOT DISTINCT FROM s.label
),
-- percentiles for the (layer, scope) rows only (grouped by `same` rather than two FILTERed
-- aggregates: the two groups run on two threads)
quantiles AS (
    SELECT blk,
        any_value(q) FILTER (WHERE same) AS same_q,
        any_value(q) FILTER (WHERE NOT same) AS diff_q
    FROM (SELECT blk, same, quantile_cont(distance::DOUBLE, [0.05, 0.5, 0.95]) AS q FROM all_pairs GROUP BY blk, same)
    GROUP BY blk
),

-- triplets within each query's neighbour list (a = the query, p and n two of its neighbours):
-- the knn view's rank orders them, so the j-th same-class neighbour, at rank r, is violated by
-- the r - j different-class neighbours ranked before it; summed per query from knn_agreement's
-- per-image counts (same_n of its n neighbours, their rank sum)
knn_triplets AS (
    SELECT layer, 'knn' AS scope, label, sum(same_rank_sum - same_n * (same_n + 1) / 2) AS violations,
        sum(same_n * (n - same_n)) AS triplets
    FROM results_knn_agreement_images
    GROUP BY GROUPING SETS ((layer), (layer, label))
),

-- global triplets: anchor uniform; positive uniform in its class block without the anchor;
-- negative uniform over the numbers outside its class block
triplet_draws AS (
    SELECT anchor, label,
        class_start + pj + (pj >= pos)::BIGINT AS p_idx,
        nj + CASE WHEN nj >= class_start THEN class_size ELSE 0 END AS n_idx
    FROM (
        SELECT a.image_id AS anchor, a.label, a.class_start, a.class_size, a.idx - a.class_start AS pos,
            (hash(d.t, getvariable('seed'), 'triplet-p') % nullif(a.class_size - 1, 0))::BIGINT AS pj,
            (hash(d.t, getvariable('seed'), 'triplet-n') % nullif(a.n - a.class_size, 0))::BIGINT AS nj
        FROM (SELECT t, (hash(t, getvariable('seed'), 'triplet-a') % n)::BIGINT AS a_idx
              FROM range(getvariable('triplets')) r(t), total) d
        JOIN numbered a ON a.idx = d.a_idx
    )
    WHERE pj IS NOT NULL AND nj IS NOT NULL  -- an anchor alone in its class, or only one class
),
triplet_ids AS MATERIALIZED (
    SELECT d.anchor, d.label, p.image_id AS positive, ng.image_id AS negative
    FROM triplet_draws d
    JOIN numbered p ON p.idx = d.p_idx
    JOIN numbered ng ON ng.idx = d.n_idx
),
global_triplets AS (
    SELECT va.layer, 'global' AS scope, t.label,
        count(*) FILTER (WHERE CASE va.metric
            WHEN 'cosine' THEN list_cosine_distance(va.vec, vp.vec) >= list_cosine_distance(va.vec, vn.vec)
            ELSE list_distance(va.vec, vp.vec) >= list_distance(va.vec, vn.vec) END) AS violations,
        count(*) AS triplets
    FROM triplet_ids t
    JOIN layer_vectors va ON va.image_id = t.anchor
    JOIN layer_vectors vp ON vp.image_id = t.positive AND vp.layer = va.layer
    JOIN layer_vectors vn ON vn.image_id = t.negative AND vn.layer = va.layer
    GROUP BY GROUPING SETS ((va.layer), (va.layer, t.label))
),
triplets AS (SELECT * FROM knn_triplets UNION ALL SELECT * FROM global_triplets)

SELECT b.layer, b.scope, s.label, s.pairs,
    s.same_n, s.same_mean, s.same_std, q.same_q[1] AS same_p05, q.same_q[2] AS same_p50, q.same_q[3] AS same_p95,
    s.diff_n, s.diff_mean, s.diff_std, q.diff_q[1] AS diff_p05, q.diff_q[2] AS diff_p50, q.diff_q[3] AS diff_p95,
    s.same_mean / nullif(s.diff_mean, 0) AS same_diff_ratio,
    (s.same_n * (2 * s.pairs + 1 - s.same_n) - s.same_ranks) / nullif(2 * s.same_n * s.diff_n, 0) AS auc,
    t.violations / nullif(t.triplets, 0) AS triplet_violation_rate,
    coalesce(t.triplets, 0) AS triplets
FROM stats s
JOIN blocks b USING (blk)
LEFT JOIN quantiles q ON q.blk = s.blk AND s.whole
LEFT JOIN triplets t ON t.layer = b.layer AND t.scope = b.scope AND t.label IS NOT DISTINCT FROM s.label;
DROP TABLE class_distances_numbered;
SET VARIABLE class_distances_params = {'layer': getvariable('layer'), 'k': getvariable('k'), 'seed': getvariable('seed'),
                                       'pairs': getvariable('pairs'), 'triplets': getvariable('triplets')};

SELECT * EXCLUDE (label) FROM results_class_distances WHERE label IS NULL ORDER BY layer, scope DESC;
