"""Small pure renderers shared by the tabs: the status block, run selector choices, plan tables."""
from __future__ import annotations

import html
from pathlib import Path

from .monitor import format_duration
from .runs import RunSummary

STATUS_COLOURS = {"running": "#2563eb", "starting": "#2563eb", "stopping": "#d97706", "stopped": "#6b7280",
                  "finished": "#16a34a", "crashed": "#dc2626", "created": "#6b7280"}


def status_html(s: RunSummary | None) -> str:
    """Name, status, step / total with a progress bar and ETA, pid and device, last message."""
    if s is None:
        return "<div class='ls-status'>No run selected. Launch one, or press <b>Find runs</b>.</div>"
    colour = STATUS_COLOURS.get(s.status, "#6b7280")
    total = s.total_steps if s.total_steps else 0
    if s.phase == "sft" and s.status == "running" and s.sft_total:
        step_text = f"SFT warm-up {s.sft_step} / {s.sft_total}"
        value, maximum = s.sft_step, s.sft_total
    else:
        step_text = f"step {s.step} / {total or '?'}"
        value, maximum = s.step, max(total, 1)
    eta = f" · ETA {format_duration(s.eta_s)}" if s.eta_s is not None and s.alive else ""
    where = ""
    if s.alive and s.pid:
        where = f" · pid {s.pid} on {'CPU' if s.slot in (None, 'cpu') else 'GPU ' + str(s.slot)}"
    ckpt = f" · last checkpoint {s.checkpoints[-1].name}" if s.checkpoints else ""
    return (
        f"<div class='ls-status'><span class='ls-name'>{html.escape(s.name)}</span> "
        f"<span class='ls-badge' style='background:{colour}' data-status='{html.escape(s.status)}'>"
        f"{html.escape(s.status)}</span>"
        f"<div class='ls-step' data-step='{s.step}' data-total='{total}'>{html.escape(step_text)}{eta}{html.escape(where)}"
        f"{html.escape(ckpt)}</div>"
        f"<progress value='{value}' max='{maximum}' style='width:100%'></progress>"
        f"<div class='ls-msg'>{html.escape(s.message)}</div></div>"
    )


def run_choices(summaries: list[RunSummary]) -> list[tuple[str, str]]:
    """(label, path): the run name, plus its parent directory when two roots hold the same name.

    No status in the label: it would go stale; the status block shows it live.
    """
    names = [s.name for s in summaries]
    return [(s.name if names.count(s.name) == 1 else f"{s.name} ({s.path.parent})", str(s.path)) for s in summaries]


def pick_default(summaries: list[RunSummary], current: str | None) -> str | None:
    """Keep the current selection if it still exists; else a live run; else the newest."""
    paths = [str(s.path) for s in summaries]
    if current in paths:
        return current
    for s in summaries:
        if s.alive:
            return str(s.path)
    return paths[0] if paths else None


def plan_as_markdown(text: str) -> str:
    """The planner's text report: table rows stay a table, every other line keeps its own line."""
    out = []
    for line in text.splitlines():
        if line.startswith("|"):
            out.append(line)
        elif line:
            out.append(line + "  ")  # markdown hard line break
        else:
            out.append("")
    return "\n".join(out)


def short_path(path: str | Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)
