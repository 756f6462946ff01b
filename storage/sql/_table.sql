-- Raw layer template (not a view itself). storage/catalog.py makes one view per table of
-- storage/tables.py from it, named after the table:
--   @files@    the quoted glob of the table's Parquet files, at the depth of its partitions;
--              it matches the typed zero-row _empty.parquet, so the view works before any
--              write, and never the hidden .tmp files of unfinished writes;
--   @hive@     hive-partitioning options (partition columns typed from the schema);
--   @columns@  the table's columns in schema order.
-- union_by_name lets files written before a column was added read it as NULL.
-- Every other view reads these views, never Parquet.
WITH parts AS (
    SELECT *
    FROM read_parquet(@files@, union_by_name = true, @hive@)
)

SELECT @columns@
FROM parts
