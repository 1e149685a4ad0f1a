-- distance_histogram: the distributions behind class_distances' figures, for pictures.
--
-- One row per (layer, scope, bin): the pairs class_distances.sql measured (scope 'knn': every
-- kNN edge; 'global': the seeded uniform sample), their distances cut into `bins` equal-width
-- bins between the block's smallest and largest distance (the last bin closed), counted
-- separately for same-class and different-class pairs:
--   layer, scope, bin (0 .. bins-1), bin_lo, bin_hi, same_n, diff_n
-- Summed over the bins, same_n and diff_n are class_distances' same_n and diff_n. Cumulated from
-- bin 0, same_n / (all same) against diff_n / (all different) is the ROC curve of distance as a
-- same-class score at the bins' upper edges: the curve behind class_distances' auc (whose exact
-- value is computed there from every pair; the area under this binned curve approaches it).
--
-- Reads class_distances.sql's pairs (results_class_distances_pairs): in the DuckDB CLI, after
-- `.read RUN/catalog.sql`, `.read queries/knn_agreement.sql` and `.read queries/class_distances.sql`
-- first, with the same parameters; this file stops with an error that says so otherwise.
-- featscope (`featscope query`, the analyze stage) runs them first when needed.
--
-- Parameters (set any before the `.read`s):
--   layer     one knn layer; NULL (default) = every layer
--   k, seed, pairs, triplets   as in class_distances.sql
--   bins      bins per (layer, scope) (default 100)
SET VARIABLE layer = coalesce(getvariable('layer'), NULL)::VARCHAR;
SET VARIABLE k = coalesce(getvariable('k'), (SELECT max(rank) FROM knn))::INTEGER;
SET VARIABLE seed = coalesce(getvariable('seed'), 0)::BIGINT;
SET VARIABLE pairs = coalesce(getvariable('pairs'), 100000)::BIGINT;
SET VARIABLE triplets = coalesce(getvariable('triplets'), 100000)::BIGINT;
SET VARIABLE bins = coalesce(getvariable('bins'), 100)::INTEGER;

SET VARIABLE distance_histogram_inputs = CASE
    WHEN getvariable('class_distances_params') IS DISTINCT FROM {'layer': getvariable('layer'), 'k': getvariable('k'),
        'seed': getvariable('seed'), 'pairs': getvariable('pairs'), 'triplets': getvariable('triplets')}
    THEN error('distance_histogram reads the pairs of class_distances.sql: .read queries/class_distances.sql first, with the same parameters')
    ELSE true END;

WITH
bounds AS (
    SELECT blk, min(distance)::DOUBLE AS lo, max(distance)::DOUBLE AS hi
    FROM results_class_distances_pairs GROUP BY blk
),
binned AS (
    SELECT p.blk,
        coalesce(least(floor((p.distance - b.lo) / nullif(b.hi - b.lo, 0) * getvariable('bins'))::INTEGER,
                       getvariable('bins') - 1), 0) AS bin,
        count(*) FILTER (WHERE p.same) AS same_n,
        count(*) FILTER (WHERE NOT p.same) AS diff_n
    FROM results_class_distances_pairs p JOIN bounds b USING (blk)
    GROUP BY ALL
)
SELECT k.layer, k.scope, r.bin::INTEGER AS bin,
    b.lo + r.bin * (b.hi - b.lo) / getvariable('bins') AS bin_lo,
    b.lo + (r.bin + 1) * (b.hi - b.lo) / getvariable('bins') AS bin_hi,
    coalesce(h.same_n, 0) AS same_n, coalesce(h.diff_n, 0) AS diff_n
FROM bounds b
JOIN results_class_distances_blocks k USING (blk)
CROSS JOIN range(getvariable('bins')) r(bin)
LEFT JOIN binned h ON h.blk = b.blk AND h.bin = r.bin
ORDER BY k.layer, k.scope DESC, r.bin;
