"""The policy model: the 4-bit base with LoRA, processors, tiny models, the streamed lm_head and its
chunk size, the vision-feature cache, the memory planner and export."""
