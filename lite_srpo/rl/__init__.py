"""One RL step and the loop around it: rollout, no-grad passes, objectives, the algorithm table, the
policy update, the loop itself, data parallelism, the SFT warm-up and the held-out evaluation."""
