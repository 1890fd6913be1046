-- The mirror's own database beside Dagster's (DATAVERSE_STORE_URL in docker-compose.yaml).
-- The postgres image runs this once, when its volume is first initialised.
CREATE DATABASE dataverse;
