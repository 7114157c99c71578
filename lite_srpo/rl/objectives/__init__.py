"""Objectives: pure tensor functions, one module per algorithm (grpo, srpo, papo, vppo, vgpo)."""
