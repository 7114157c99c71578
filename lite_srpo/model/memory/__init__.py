"""`lite-srpo plan`: the predicted peak memory of one training step, before anything loads."""
