"""The raw archive: change-set folders on disk (change_sets) and their compacted Parquet form
(compacted). The lowest layer but the base modules: it imports nothing else of ours."""
