"""Training infrastructure used by `train.py`: typed run config, checkpoints, logging, schedules."""
