"""lite-srpo: RLVR (GRPO, DAPO, Dr.GRPO, SRPO, PAPO, VPPO, VGPO) for vision-language models on one GPU."""

__version__ = "0.1.0"
