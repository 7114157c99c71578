"""The lm_head weight's memory layout on CPU: row-major `[V, H]` (as loaded) against column-major (the
transpose of a contiguous `[H, V]`), which `load_policy` uses on CPU (`policy.column_major_lm_head`).

Two measures, each alternating the two layouts so that load from other processes hits both alike:
1. `x @ W.T` alone at the row counts a decode step (1, 2, 8 rows) and a training chunk (128, 1,024 rows) use;
2. whole rollouts (`rollout.generate`, every response `R` tokens long, as bench/vs_trl.py) on the bench
   model, with the sampled tokens compared between layouts (same seed).
Writes bench/results/<name>.json.

    python -m bench.lm_head_layout --group-size 2 --length 256
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.common import QUICK_DIMS, REAL_VOCAB, build_bench_model, write_result


def matmul_times(vocab: int, hidden: int, rows: list[int], repeats: int) -> list[dict]:
    """Milliseconds per `x @ W.T` for each row count, both layouts, best of `repeats` alternating rounds."""
    import torch

    row_major = torch.randn(vocab, hidden)
    column_major = row_major.t().contiguous().t()
    out = []
    for m in rows:
        x = torch.randn(m, hidden)
        inner = 20 if m <= 8 else 2
        best = {"row_major": float("inf"), "column_major": float("inf")}
        for _ in range(repeats):
            for name, w in (("row_major", row_major), ("column_major", column_major)):
                torch.nn.functional.linear(x, w)
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.nn.functional.linear(x, w)
                best[name] = min(best[name], (time.perf_counter() - t0) / inner * 1e3)
        out.append({"rows": m, "row_major_ms": best["row_major"], "column_major_ms": best["column_major"],
                    "speedup": best["row_major"] / best["column_major"]})
        print(f"rows {m:5d}: row-major {best['row_major']:8.2f} ms, column-major {best['column_major']:8.2f} ms, "
              f"x{out[-1]['speedup']:.2f}")
    return out


def rollout_ab(model_path: str, group: int, length: int, repeats: int) -> dict:
    """Alternating whole rollouts with the two layouts on one loaded policy; tokens compared per repeat."""
    import torch

    from bench.profile_generation import load
    from lite_srpo.rl.rollout import generate

    policy, prompt = load(model_path, group, length)
    head = policy.hf.get_output_embeddings()
    column_major = head.weight
    row_major = torch.nn.Parameter(column_major.detach().contiguous(), requires_grad=False)
    runs, same = [], []
    for r in range(repeats):
        tokens = {}
        for name, weight in (("row_major", row_major), ("column_major", column_major)):
            head.weight = weight
            torch.manual_seed(r)
            t0 = time.perf_counter()
            batch = generate(policy, [prompt], group, length)
            runs.append({"repeat": r, "layout": name, "generate_s": time.perf_counter() - t0})
            tokens[name] = batch.response_ids
            print(f"rollout {r} {name}: {runs[-1]['generate_s']:.1f} s")
        same.append(bool(torch.equal(tokens["row_major"], tokens["column_major"])))
    total = {k: sum(x["generate_s"] for x in runs if x["layout"] == k) for k in ("row_major", "column_major")}
    return {"G": group, "R": length, "runs": runs, "same_tokens_per_repeat": same,
            "ratio_column_over_row": total["column_major"] / total["row_major"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lm_head_layout", description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 128, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="lm_head_layout")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny vocabulary and lengths (smoke test)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    dims = dict(QUICK_DIMS) if a.quick else {}
    model = build_bench_model(**dims)
    vocab, hidden = dims.get("vocab", REAL_VOCAB), dims.get("hidden", 256)
    result = {
        "settings": {"threads": a.threads, "vocab": vocab, "hidden": hidden, "model": str(model)},
        "matmul": matmul_times(vocab, hidden, a.rows, a.repeats),
        "rollouts": rollout_ab(str(model), a.group_size, a.length, a.repeats),
        "notes": ["best-of-repeats per matmul; rollouts are plain wall time, alternating layouts",
                  "same_tokens_per_repeat: the sampled tokens of the two layouts, same seed (the GEMM kernels may "
                  "sum in another order, so a logit can differ in its last bits)"],
    }
    print(f"rollouts: column-major / row-major = {result['rollouts']['ratio_column_over_row']:.3f}, "
          f"same tokens {result['rollouts']['same_tokens_per_repeat']}")
    print(write_result(a.name, result, a.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
