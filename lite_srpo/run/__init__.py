"""A run's plumbing: its directory (checkpoints, events, curves), progress, trackers, and the process
(signals, memory readings, the process group, the launcher, preflight checks)."""
