"""The three stages of a sync, without Dagster: fetch (fetch_plan decides, fetch does the
I/O), stage, publish (plan, then execute), drift, and steps, the plain functions the assets,
the command line and rebuild share."""
