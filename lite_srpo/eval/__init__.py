"""After training: `lite-srpo eval` on benchmarks, bootstrap statistics, `compare` and the demo."""
