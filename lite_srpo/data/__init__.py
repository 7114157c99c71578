"""Samples: procedural tasks, local and hub datasets, train/validation/test splits, prompts and
response roles, image corruptions."""
