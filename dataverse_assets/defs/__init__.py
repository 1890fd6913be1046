"""Dagster only: the assets each entity becomes, their checks, the sensors and schedules, the
change-set partitions, the resources and IO managers, and the definitions that tie them up.
The work itself is sync's; this layer says when and where it runs."""
