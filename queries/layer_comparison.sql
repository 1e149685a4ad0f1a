-- layer_comparison: which feature-map distance explains the network best?
--
-- One row per knn layer: each vector set (layer alias x pooling: gap, flat, cam; penultimate) x
-- each metric (l2, cosine) the run indexed, with its headline figures side by side. The
-- definitions are those of knn_agreement.sql (scope 'all') and class_distances.sql:
--   layer, features, pooling, metric, dim   what the row measures (the index_layers view)
--   n, agreement, pred_agreement, knn_accuracy, precision_at_1, r_precision, map_at_r, deep_n
--   knn_* / global_*   pairs, same_mean, diff_mean, same_diff_ratio, auc, triplet_violation_rate
--                      of the kNN edges ('knn') and of the seeded uniform sample ('global')
-- Rows are ordered best first by map_at_r, then agreement: higher is better for agreement,
-- knn_accuracy, precision_at_1, r_precision, map_at_r and auc; lower for same_diff_ratio and
-- triplet_violation_rate. Distances of different metrics are not comparable with each other;
-- the ranks, AUCs and rates are.
--
-- Parameters (set any before `.read`):
--   k         neighbours per image, 1 .. the run's k; default = every neighbour the knn view lists
--   seed      the sampling seed (default 0)
--   pairs     global pairs sampled (default 100000)
--   triplets  global triplets sampled (default 100000)
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE seed = coalesce(getvariable('seed'), 0)::BIGINT;
SET VARIABLE pairs = coalesce(getvariable('pairs'), 100000)::BIGINT;
SET VARIABLE triplets = coalesce(getvariable('triplets'), 100000)::BIGINT;

WITH
labels AS (SELECT image_id, label, label_name FROM images),

-- ---- kNN agreement (knn_agreement.sql, scope 'all') ----------------------------------------------
neighbours AS (
    SELECT knn.layer, knn.query_id, list(nb.label ORDER BY knn.rank) AS nb_labels
    FROM knn JOIN labels nb ON nb.image_id = knn.neighbor_id
    WHERE knn.rank <= getvariable('k')
    GROUP BY knn.layer, knn.query_id
),
per_image AS (
    SELECT n.layer, q.label,
        len(list_filter(n.nb_labels, lambda x: x = q.label)) / len(n.nb_labels) AS agreement,
        len(list_filter(n.nb_labels, lambda x: x = p.pred)) / len(n.nb_labels) AS pred_agreement,
        list_transform(n.nb_labels, lambda x: len(list_filter(n.nb_labels, lambda y: y = x))) AS votes,
        n.nb_labels[list_position(votes, list_max(votes))] = q.label AS knn_correct
    FROM neighbours n
    JOIN labels q ON q.image_id = n.query_id
    LEFT JOIN predictions p ON p.image_id = n.query_id AND p.view = 'orig'
),
agreement AS (
    SELECT layer, count(*) AS n, avg(agreement) AS agreement, avg(pred_agreement) AS pred_agreement,
        avg(knn_correct::INTEGER) AS knn_accuracy
    FROM per_image GROUP BY layer
),
class_sizes AS (
    SELECT l.label, count(*) AS size
    FROM predictions p JOIN labels l USING (image_id) WHERE p.view = 'orig' GROUP BY l.label
),
-- the R = class size - 1 nearest of each searched query (fewer when knn_deep stops earlier)
deep AS (
    SELECT d.layer, d.query_id, q.label, d.rank, nb.label = q.label AS hit
    FROM knn_deep d
    JOIN labels q ON q.image_id = d.query_id
    JOIN class_sizes cs ON cs.label = q.label
    JOIN labels nb ON nb.image_id = d.neighbor_id
    WHERE d.rank < cs.size
),
musgrave AS (
    -- per query: R = the rows kept, and the ranks of the hits; the j-th hit, at rank i, adds
    -- precision@i = j / i to MAP@R
    SELECT layer,
        avg(coalesce(hit_ranks[1] = 1, false)::INTEGER) AS precision_at_1,
        avg(coalesce(len(hit_ranks), 0) / r) AS r_precision,
        avg(coalesce(list_sum(list_transform(hit_ranks, lambda i, j: j / i)), 0) / r) AS map_at_r,
        count(*) AS deep_n
    FROM (
        SELECT layer, query_id, label, count(*) AS r, list_sort(list(rank) FILTER (WHERE hit)) AS hit_ranks
        FROM deep
        GROUP BY layer, query_id, label
    )
    GROUP BY layer
),

-- ---- distances (class_distances.sql) ----------------------------------------------
measured_layers AS (
    SELECT layer, features, metric FROM index_layers
    WHERE layer IN (SELECT DISTINCT layer FROM knn)
),
vectors AS (SELECT layer AS features, image_id, vec FROM embeddings WHERE view = 'orig'),
knn_pairs AS (
    SELECT knn.layer, 'knn' AS scope, knn.query_id AS anchor, q.label, knn.rank, knn.distance, q.label = nb.label AS same
    FROM knn
    JOIN labels q ON q.image_id = knn.query_id
    JOIN labels nb ON nb.image_id = knn.neighbor_id
    WHERE knn.rank <= getvariable('k')
),
numbered AS (
    SELECT image_id, label,
        row_number() OVER (ORDER BY label, image_id) - 1 AS idx,
        row_number() OVER (ORDER BY label, image_id) - row_number() OVER (PARTITION BY label ORDER BY image_id) AS class_start,
        count(*) OVER (PARTITION BY label) AS class_size,
        count(*) OVER () AS n
    FROM predictions JOIN labels USING (image_id)
    WHERE view = 'orig'
),
total AS (SELECT any_value(n) AS n FROM numbered),
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
    JOIN numbered pa ON pa.idx = d.a
    JOIN numbered pb ON pb.idx = d.b
),
layer_vectors AS (
    SELECT l.layer, l.metric, v.image_id, v.vec
    FROM measured_layers l JOIN vectors v ON v.features = l.features
),
global_pairs AS (
    SELECT va.layer, 'global' AS scope, p.anchor, p.label, p.same,
        CASE va.metric WHEN 'cosine' THEN list_cosine_distance(va.vec, vb.vec)
                       ELSE list_distance(va.vec, vb.vec) END AS distance
    FROM pair_ids p
    JOIN layer_vectors va ON va.image_id = p.anchor
    JOIN layer_vectors vb ON vb.image_id = p.other AND vb.layer = va.layer
),
all_pairs AS (
    SELECT layer, scope, label, distance, same FROM knn_pairs
    UNION ALL
    SELECT layer, scope, label, distance, same FROM global_pairs
),
stats AS (
    SELECT layer, scope, count(*) AS pairs,
        avg(distance) FILTER (WHERE same) AS same_mean,
        avg(distance) FILTER (WHERE NOT same) AS diff_mean
    FROM all_pairs GROUP BY layer, scope
),
auc AS (
    -- neg_before: the different pairs sorting before a row, farther in its own (layer, scope) block
    -- or anywhere in the blocks before it; a block's smallest neg_before is what the blocks before it hold
    SELECT layer, scope,
        (sum(pos * (2 * neg_before + neg)) - 2 * min(neg_before) * sum(pos)) / nullif(2 * sum(pos) * sum(neg), 0) AS auc
    FROM (
        SELECT *, sum(neg) OVER (ORDER BY layer, scope, distance DESC) - neg AS neg_before
        FROM (SELECT layer, scope, distance, count(*) FILTER (WHERE same) AS pos, count(*) FILTER (WHERE NOT same) AS neg
              FROM all_pairs GROUP BY layer, scope, distance)
    )
    GROUP BY layer, scope
),
-- triplets within each query's neighbour list: the knn view's rank orders them, so the j-th
-- same-class neighbour, at rank r, is violated by the r - j different-class neighbours before it
knn_triplets AS (
    SELECT layer, 'knn' AS scope, sum(rank_sum - n_same * (n_same + 1) / 2) AS violations,
        sum(n_same * (n - n_same)) AS triplets
    FROM (
        SELECT layer, anchor, count(*) AS n, count(*) FILTER (WHERE same) AS n_same,
            coalesce(sum(rank) FILTER (WHERE same), 0) AS rank_sum
        FROM knn_pairs
        GROUP BY layer, anchor
    )
    GROUP BY layer
),
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
    WHERE pj IS NOT NULL AND nj IS NOT NULL
),
triplet_ids AS MATERIALIZED (
    SELECT d.anchor, d.label, p.image_id AS positive, ng.image_id AS negative
    FROM triplet_draws d
    JOIN numbered p ON p.idx = d.p_idx
    JOIN numbered ng ON ng.idx = d.n_idx
),
global_triplets AS (
    SELECT va.layer, 'global' AS scope,
        count(*) FILTER (WHERE CASE va.metric
            WHEN 'cosine' THEN list_cosine_distance(va.vec, vp.vec) >= list_cosine_distance(va.vec, vn.vec)
            ELSE list_distance(va.vec, vp.vec) >= list_distance(va.vec, vn.vec) END) AS violations,
        count(*) AS triplets
    FROM triplet_ids t
    JOIN layer_vectors va ON va.image_id = t.anchor
    JOIN layer_vectors vp ON vp.image_id = t.positive AND vp.layer = va.layer
    JOIN layer_vectors vn ON vn.image_id = t.negative AND vn.layer = va.layer
    GROUP BY va.layer
),
triplets AS (SELECT * FROM knn_triplets UNION ALL SELECT * FROM global_triplets),
distances AS (   -- one row per layer: the two scopes side by side
    SELECT s.layer,
        max(s.pairs) FILTER (WHERE s.scope = 'knn') AS knn_pairs,
        max(s.same_mean) FILTER (WHERE s.scope = 'knn') AS knn_same_mean,
        max(s.diff_mean) FILTER (WHERE s.scope = 'knn') AS knn_diff_mean,
        max(s.same_mean / nullif(s.diff_mean, 0)) FILTER (WHERE s.scope = 'knn') AS knn_same_diff_ratio,
        max(a.auc) FILTER (WHERE s.scope = 'knn') AS knn_auc,
        max(t.violations / nullif(t.triplets, 0)) FILTER (WHERE s.scope = 'knn') AS knn_triplet_violation_rate,
        max(s.pairs) FILTER (WHERE s.scope = 'global') AS global_pairs,
        max(s.same_mean) FILTER (WHERE s.scope = 'global') AS global_same_mean,
        max(s.diff_mean) FILTER (WHERE s.scope = 'global') AS global_diff_mean,
        max(s.same_mean / nullif(s.diff_mean, 0)) FILTER (WHERE s.scope = 'global') AS global_same_diff_ratio,
        max(a.auc) FILTER (WHERE s.scope = 'global') AS global_auc,
        max(t.violations / nullif(t.triplets, 0)) FILTER (WHERE s.scope = 'global') AS global_triplet_violation_rate
    FROM stats s
    JOIN auc a USING (layer, scope)
    LEFT JOIN triplets t USING (layer, scope)
    GROUP BY s.layer
)

SELECT ag.layer, il.features, il.pooling, il.metric, il.dim,
    ag.n, ag.agreement, ag.pred_agreement, ag.knn_accuracy,
    m.precision_at_1, m.r_precision, m.map_at_r, coalesce(m.deep_n, 0) AS deep_n,
    d.knn_pairs, d.knn_same_mean, d.knn_diff_mean, d.knn_same_diff_ratio, d.knn_auc, d.knn_triplet_violation_rate,
    d.global_pairs, d.global_same_mean, d.global_diff_mean, d.global_same_diff_ratio, d.global_auc,
    d.global_triplet_violation_rate
FROM agreement ag
LEFT JOIN index_layers il USING (layer)
LEFT JOIN musgrave m USING (layer)
LEFT JOIN distances d USING (layer)
ORDER BY m.map_at_r DESC NULLS LAST, ag.agreement DESC, ag.layer;
