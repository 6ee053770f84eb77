"""Training machinery shared by the stages: the stage base, checkpoints and exact resume, FSDP2
sharding, loggers, callbacks, optimiser groups and schedules, and the checks a run makes first."""
