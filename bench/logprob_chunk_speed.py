"""Seconds of the streamed lm_head (`streaming.token_logprobs`) per chunk size, without and with backward.

What `train.logprob_chunk` costs in time, apart from everything else in a step: random hidden states
[N, T, H] and a random fp32 lm_head [V, H] (the bench model's V = 151,936, H = 256), one torch thread,
each chunk size measured `--repeats` times, alternating. Writes bench/results/<name>.json.

    python -m bench.logprob_chunk_speed
    python -m bench.logprob_chunk_speed --paths fused checkpointed --chunks 1024 256 --length 2048 --name lm_head_fused

`--paths`: the frozen lm_head's gradient computed in the forward (`fused`, the default) or by
checkpointed recompute (`checkpointed`, the path before it), alternating, so their ratio is in one run.
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.common import REAL_VOCAB, table, write_result


def measure(chunk: int, vocab: int, hidden: int, rows: int, length: int, seed: int = 0, path: str = "fused") -> dict:
    """One no-grad pass and one forward + backward over [rows, length] tokens at this chunk size."""
    import torch

    from lite_srpo.model import streaming
    from lite_srpo.model.streaming import token_logprobs

    streaming.FUSED = path == "fused"
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.02
    h = torch.randn(rows, length, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows, length), generator=g)
    t0 = time.perf_counter()
    with torch.no_grad():
        token_logprobs(h, weight, targets, chunk=chunk)
    t1 = time.perf_counter()
    token_logprobs(h, weight, targets, chunk=chunk).sum().backward()
    t2 = time.perf_counter()
    return {"chunk": chunk, "path": path, "nograd_s": t1 - t0, "grad_s": t2 - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.logprob_chunk_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 512, 256, 128, 64])
    ap.add_argument("--vocab", type=int, default=REAL_VOCAB)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", nargs="+", default=["fused"], choices=["fused", "checkpointed"])
    ap.add_argument("--name", default="logprob_chunk_speed")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.quick:
        a.vocab, a.length, a.chunks, a.repeats = 4096, 64, [64, 16], 1
    runs = [measure(c, a.vocab, a.hidden, a.rows, a.length, seed=r, path=p) | {"repeat": r}
            for r in range(a.repeats) for c in a.chunks for p in a.paths]
    summary = []
    for c in a.chunks:
        for p in a.paths:
            mine = [x for x in runs if x["chunk"] == c and x["path"] == p]
            summary.append({"chunk": c, "path": p, "nograd_s": sum(x["nograd_s"] for x in mine) / len(mine),
                            "grad_s": sum(x["grad_s"] for x in mine) / len(mine),
                            "logits_gib_in_backward": c * a.vocab * 4 * 4 / 2**30})
    print(table(summary, ["chunk", "path", "nograd_s", "grad_s", "logits_gib_in_backward"]))
    path = write_result(a.name, {"settings": {"vocab": a.vocab, "hidden": a.hidden, "tokens": a.rows * a.length,
                                              "threads": a.threads, "dtype": "float32"},
                                 "runs": runs, "summary": summary}, a.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
