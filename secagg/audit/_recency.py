"""Which controls changed most recently: the order a run with a time budget takes them in.

A control's time is the newest commit touching what it depends on: its entry in the controls
file, the file it edits, and the files of the tests it lists. Uncommitted work counts as
newer than any commit. The controls nothing touched for longest are those a budget leaves out:
they came out caught in the runs since their last change, and only a change elsewhere (a shared
fixture, a helper) can have altered what they prove. Where git cannot tell (no repository, a
shallow clone, a controls file outside the repository), the order is the file's, and the
reason is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from secagg.audit._workspace import _git
from secagg.audit.controls import AuditError, Control


def _path_times(root: Path) -> dict[str, float]:
    """Each path's newest commit time (paths relative to ``root``); uncommitted ones:
    infinity. NUL-separated: a path with a quote or a non-ASCII letter is not escaped."""
    times: dict[str, float] = {}
    when = 0.0
    out = _git(root, "log", "-z", "--format=%x01%ct", "--name-only", "--no-renames")
    for item in out.split("\0"):  # ("\1TIME", then "\nPATH", "PATH", ... per commit)
        if item.startswith("\1"):
            when = float(item[1:])
        elif name := item.removeprefix("\n"):
            # (the newest of its commits: a commit dated before its parent is not last)
            times[name] = max(times.get(name, 0.0), when)
    # defence: audit.budget-uncommitted-file-newest
    now = math.inf
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--no-renames")
    for item in status.split("\0"):
        if len(item) > 3:
            times[item[3:]] = now
    return times


def _line_times(root: Path, path: Path) -> list[float]:
    """The commit time of each line of ``path`` (uncommitted lines: infinity), from git
    blame."""
    out: list[float] = []
    uncommitted = False
    for line in _git(root, "blame", "--line-porcelain", "--", str(path)).splitlines():
        if line.startswith("\t"):  # (the line's text)
            continue
        head = line.split(" ", 1)[0]
        if len(head) == 40 and all(ch in "0123456789abcdef" for ch in head):
            uncommitted = set(head) == {"0"}  # (each line's block starts with its commit)
        elif line.startswith("committer-time "):
            # defence: audit.budget-uncommitted-entry-newest
            out.append(math.inf if uncommitted else float(line.split()[1]))
    return out


def entry_times(root: Path, controls_file: Path, controls: Sequence[Control]) -> dict[str, float]:
    """Each control's newest line in the controls file (from its ``[[control]]`` line to
    the next entry's, of every entry in the file, whichever are selected)."""
    lines = _line_times(root, controls_file)
    text = controls_file.read_text(encoding="utf-8").splitlines()
    starts = [n for n, line in enumerate(text, 1) if line.strip() == "[[control]]"]
    out: dict[str, float] = {}
    for c in controls:
        if c.line <= 0:
            continue
        later = [s for s in starts if s > c.line]
        end = later[0] - 1 if later else len(lines)
        span = lines[c.line - 1:end]
        # defence: audit.budget-entry-changes-count
        out[c.id] = max(span) if span else 0.0
    return out


def newest_first(root: Path, controls_file: Path,
                 controls: Sequence[Control]) -> tuple[list[Control], str]:
    """``controls``, the most recently changed first (ties in the file's order), and why
    the order is the file's, if it is (empty when it is not)."""
    controls_file = controls_file.resolve()
    try:
        if _git(root, "rev-parse", "--is-shallow-repository").strip() == "true":
            return list(controls), "a shallow clone: git does not know when files changed"
        paths = _path_times(root)
    except (AuditError, OSError, ValueError) as e:
        return list(controls), f"git does not say when files changed ({e})"
    why = ""
    try:
        inside = controls_file.is_relative_to(root.resolve())
        entries = entry_times(root, controls_file, controls) if inside else {}
        if not inside:
            why = "the controls file is outside the repository: its entries' changes not known"
    except (AuditError, OSError, ValueError) as e:
        entries, why = {}, f"its entries' changes not known ({e})"

    def newest(c: Control) -> float:
        files = [c.file, *(t.split("::", 1)[0] for t in c.tests)]
        return max([entries.get(c.id, 0.0), *(paths.get(f, 0.0) for f in files)])

    # defence: audit.budget-runs-the-newest-first
    return sorted(controls, key=lambda c: -newest(c)), why
