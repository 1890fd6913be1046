"""The celery settings of a dagster-celery worker (`celery -A dagster_celery.app worker` imports
this module when its folder is on PYTHONPATH): the broker and result backend from the same
variables the runs read (DAGSTER_CELERY_BROKER_URL, DAGSTER_CELERY_BACKEND_URL), so a password
in them is written nowhere."""

import os

broker_url = os.environ["DAGSTER_CELERY_BROKER_URL"]
result_backend = os.environ["DAGSTER_CELERY_BACKEND_URL"]
# One step at a time per worker process; a step's task is acknowledged when it is taken.
worker_prefetch_multiplier = 1
