"""The training stage: config validation, instantiation, the task wrapper, DDP launching."""
