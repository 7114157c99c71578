"""The statistics and the figure of a `lite-srpo compare` result, recomputable from its JSON alone.

`compare.json` keeps every run's per-item scores, so the report can be redone (or several result files
from the same warm-up, seeds and items merged, e.g. SRPO ablations run after the main comparison)
without training again: `lite-srpo compare --report runs/a/compare.json [runs/b/compare.json ...]`.

Each contrast gets three intervals, because with K = 4 seeds no single one is safe on its own:
- the two-level bootstrap (seeds, then items) at 95 %, the pre-registered decision rule;
- the same at the Bonferroni level for the number of contrasts reported;
- a t-interval over the K per-seed differences, which does not understate the seed spread as a
  bootstrap over four seeds does.
It also recomputes, from this run's own variance, the smallest effect the design could have seen.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .stats import detectable_effect, paired_seeds_items, seeds_items_ci, seeds_t_interval, variance_components

# (arm, the base arm its paper builds on): SRPO, VPPO and VGPO on DAPO, PAPO on GRPO.
PAIRS = (("srpo", "dapo"), ("papo", "grpo"), ("vppo", "dapo"), ("vgpo", "dapo"))
ABLATION_BASE = "srpo"  # arms named srpo_<variant> are SRPO ablations, contrasted with default SRPO
PROTOCOL_KEYS = ("avg@8", "greedy")


def pairs_for(arms: list[str]) -> list[tuple[str, str]]:
    """The paper contrasts whose two arms both ran, then every `srpo_*` ablation against `srpo`."""
    out = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    out += [(a, ABLATION_BASE) for a in arms if a.startswith(ABLATION_BASE + "_") and ABLATION_BASE in arms]
    return out


def arm_seeds(result: dict) -> dict[str, list[int]]:
    """Each arm's seeds, in the order of its per-seed score lists (the order its runs finished)."""
    if "arm_seeds" in result:
        return result["arm_seeds"]
    out: dict[str, list[int]] = {}
    for r in result.get("runs", []):
        out.setdefault(r["arm"], []).append(r["seed"])
    return {arm: out.get(arm, list(range(len(per["greedy"])))) for arm, per in result["items"].items()}


def common_seeds(a: list[list[float]], seeds_a: list[int], b: list[list[float]], seeds_b: list[int]):
    """The two arms' score lists restricted to the seeds both finished, in seed order: a contrast pairs
    seed k of one arm with seed k of the other, never with whichever run happened to be k-th."""
    shared = sorted(set(seeds_a[:len(a)]) & set(seeds_b[:len(b)]))
    return ([a[seeds_a.index(s)] for s in shared], [b[seeds_b.index(s)] for s in shared], shared)


def contrast(a: list[list[float]], b: list[list[float]], n_contrasts: int,
             seeds_a: list[int] | None = None, seeds_b: list[int] | None = None) -> dict:
    """Arm a minus arm b on the seeds both finished (same items), in accuracy units (×100 for points)."""
    seeds_a = seeds_a if seeds_a is not None else list(range(len(a)))
    seeds_b = seeds_b if seeds_b is not None else list(range(len(b)))
    a, b, shared = common_seeds(a, seeds_a, b, seeds_b)
    k = len(shared)
    out = paired_seeds_items(a, b)
    out["seeds"] = k
    out["seed_values"] = shared
    out["ci_bonferroni"] = paired_seeds_items(a, b, level=1 - 0.05 / max(n_contrasts, 1))["ci95"]
    out["t95"] = seeds_t_interval(out["per_seed"])
    diffs = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).tolist()
    if k >= 2:
        comp = variance_components(diffs)
        out["variance_components"] = comp
        out["design"] = detectable_effect(comp, seeds=k, items=len(diffs[0]))
    out["established"] = bool(out["ci95"][0] > 0 or out["ci95"][1] < 0)
    return out


def analyse(result: dict) -> dict:
    """Per-arm means with CIs and every contrast, from `result["items"][arm][protocol] = [seed][item]`."""
    items = {arm: per for arm, per in result["items"].items() if per.get("greedy")}
    seeds = arm_seeds(result)
    pairs = pairs_for(list(items))
    arms = {arm: {key: seeds_items_ci(v) | {"per_seed": np.mean(v, axis=1).tolist()}
                  for key, v in per.items() if v} | {"seeds": seeds.get(arm, [])[:len(per["greedy"])]}
            for arm, per in items.items()}
    paired = {f"{a}-{b}": {key: contrast(items[a][key], items[b][key], len(pairs), seeds.get(a), seeds.get(b))
                           for key in PROTOCOL_KEYS}
              for a, b in pairs}
    return {"arms": arms, "paired": paired}


def merge(results: list[dict]) -> dict:
    """Several compare results from the same warm-up and test items as one. Arms from later files are
    added, and so are an arm's seeds that an earlier file lacks (`compare --first-seed` runs); a seed
    present twice keeps the first file's run. Each arm's seeds end up in seed order. Refuses results
    scored on different items."""
    base = dict(results[0])
    by_seed: dict[str, dict[int, dict[str, list[float]]]] = {}
    runs: list[dict] = []
    for i, other in enumerate(results):
        if i and (other["n_test"] != base["n_test"] or other["warmup_items"] != base["warmup_items"]):
            raise ValueError("compare --report: these results do not share the warm-up and test items")
        seeds = arm_seeds(other)
        for arm, per in other["items"].items():
            for j, seed in enumerate(seeds[arm][:len(per["greedy"])]):
                if seed in by_seed.setdefault(arm, {}):
                    continue
                by_seed[arm][seed] = {key: v[j] for key, v in per.items() if len(v) > j}
                runs += [r for r in other.get("runs", []) if r["arm"] == arm and r["seed"] == seed]
    base["items"] = {arm: {key: [per[s][key] for s in sorted(per) if key in per[s]] for key in PROTOCOL_KEYS}
                     for arm, per in by_seed.items()}
    base["arm_seeds"] = {arm: sorted(per) for arm, per in by_seed.items()}
    base["runs"] = runs
    return base


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def format_contrasts(paired: dict) -> list[str]:
    lines = ["| contrast | seeds | avg@8, points [95 % CI] | Bonferroni CI | t-interval over seeds | per seed | "
             "greedy, points [95 % CI] | design: 95 % half-width / 80 %-power effect (avg@8) | established? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, d in paired.items():
        m, g = d["avg@8"], d["greedy"]
        design = d["avg@8"].get("design")
        design_txt = f"{100 * design['ci_half_width']:.1f} / {100 * design['detectable']:.1f}" if design else "-"
        lines.append(
            f"| {name.replace('-', ' − ')} | {m['seeds']} | **{_pts(m['mean'])}** [{_pts(m['ci95'][0])}, {_pts(m['ci95'][1])}] "
            f"| [{_pts(m['ci_bonferroni'][0])}, {_pts(m['ci_bonferroni'][1])}] "
            f"| [{_pts(m['t95'][0])}, {_pts(m['t95'][1])}] | {', '.join(_pts(x) for x in m['per_seed'])} "
            f"| {_pts(g['mean'])} [{_pts(g['ci95'][0])}, {_pts(g['ci95'][1])}] | {design_txt} "
            f"| {'yes' if m['established'] else 'no'} |")
    return lines


def format_arms(result: dict, arms: dict) -> list[str]:
    lines = ["| arm | seeds | avg@8, T = 1 [95 % CI] | avg@8 per seed | greedy [95 % CI] | s / step |",
             "|---|---|---|---|---|---|"]
    for arm, s in arms.items():
        per_step = [r["seconds_per_step"] for r in result["runs"] if r["arm"] == arm]
        a, g = s["avg@8"], s["greedy"]
        lines.append(f"| {arm} | {len(a['per_seed'])} | {a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] "
                     f"| {', '.join(f'{x:.3f}' for x in a['per_seed'])} "
                     f"| {g['mean']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] | {np.mean(per_step):.2f} |")
    return lines


def plot_compare(result: dict, analysis: dict, out: Path) -> Path:
    """Two panels: each arm's avg@8 and greedy with 95 % CIs (warm-up dashed), and each contrast in
    points with its bootstrap CI (thick) and t-interval (thin), zero marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, paired = analysis["arms"], analysis["paired"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    names = list(arms)
    for offset, key, colour in ((-0.12, "avg@8", "tab:blue"), (0.12, "greedy", "tab:orange")):
        means = [arms[a][key]["mean"] for a in names]
        lo = [arms[a][key]["mean"] - arms[a][key]["ci95"][0] for a in names]
        hi = [arms[a][key]["ci95"][1] - arms[a][key]["mean"] for a in names]
        xs = np.arange(len(names)) + offset
        left.errorbar(xs, means, yerr=[lo, hi], fmt="o", color=colour, capsize=4, label=key)
        warm = result.get("warmup", {}).get(key, {}).get("accuracy")
        if warm is not None:
            left.axhline(warm, color=colour, ls="--", lw=1, label=f"warm-up {key}")
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("held-out accuracy")
    left.set_title(f"arms: {result['n_test']} items, seeds per arm as run (95 % CI, seeds × items)")
    left.legend(fontsize=8)
    cnames = list(paired)
    for i, name in enumerate(cnames):
        d = paired[name]["avg@8"]
        right.plot([100 * d["t95"][0], 100 * d["t95"][1]], [i, i], color="grey", lw=1)
        right.plot([100 * d["ci95"][0], 100 * d["ci95"][1]], [i, i], color="tab:blue", lw=4)
        right.plot([100 * d["mean"]], [i], "o", color="black")
    right.axvline(0, color="black", lw=0.8)
    right.set_yticks(range(len(cnames)), [n.replace("-", " − ") for n in cnames])
    right.invert_yaxis()
    right.set_xlabel("avg@8 difference, points (thick: 95 % bootstrap CI; thin: t-interval over seeds)")
    right.set_title("paired contrasts (same seeds, same items)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def report(paths: list[str], out: str | None = None) -> dict:
    """`lite-srpo compare --report`: re-analyse saved results, print the tables, write JSON and PNG."""
    result = merge([json.loads(Path(p).read_text()) for p in paths])
    result.update(analyse(result))
    target = Path(out) if out else Path(paths[0]).with_name("report.json")
    result["figure"] = str(plot_compare(result, result, target.with_suffix(".png")))
    target.write_text(json.dumps(result, indent=1))
    print("\n".join(format_arms(result, result["arms"]) + [""] + format_contrasts(result["paired"])))
    print(f"report: {target} and {result['figure']}")
    return result
