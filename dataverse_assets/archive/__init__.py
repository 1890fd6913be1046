"""The raw archive: change sets (change_sets) and their compacted Parquet form (compacted),
stored in a local folder or an S3-compatible bucket (storage). The lowest layer but the base
modules: it imports nothing else of ours but config, errors and names."""
