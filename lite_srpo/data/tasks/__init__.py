"""Datasets: local files, benchmark copies and procedural tasks, all producing :class:`Sample` lists."""
from lite_srpo.data.tasks.base import Sample
from lite_srpo.data.tasks.benchmarks import load_benchmark
from lite_srpo.data.tasks.images import load_image
from lite_srpo.data.tasks.loader import load_samples, write_jsonl
from lite_srpo.data.tasks.procedural import TASKS, make_task

__all__ = ["Sample", "TASKS", "load_benchmark", "load_image", "load_samples", "make_task", "write_jsonl"]
