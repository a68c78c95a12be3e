"""The threat-model report: every attack the suite tries, its outcome, and the controls that
show the test can fail.

``secagg threat-model run --out DIR`` runs ``tests/threat_model/`` (one module per adversary,
each test named after the attack it tries), then the weakened-build controls, and writes
``DIR/threat-model-report.md`` (for a security auditor) and ``DIR/threat-model-report.json``.

For each test: the adversary (first line of the module docstring), the attack (test name and
first line of its docstring), the property it checks (a ``Property:`` line of the docstring if
there is one; otherwise the test name's claim, with the exceptions and refusal reasons the test
asserts, found by an AST scan), the result, and the caught controls that list the test.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from secagg.audit._workspace import Workspace, revision
from secagg.audit.controls import Control, function_id, problems
from secagg.audit.runner import ControlRunner, ControlsRun, PytestRun, failing, matching, run_suite

THREAT_MODEL_DIR = "tests/threat_model"
REPORT_NAME = "threat-model-report"
_REASON_ENUMS = {"AbortReason", "RefusalReason"}


def _first_line(doc: str | None, limit: int = 240) -> str:
    """The docstring's first line, continued to the end of its sentence if it wraps."""
    paragraph = []
    for ln in (doc or "").strip().splitlines():
        if not ln.strip() or ln.strip().lower().startswith("property:"):
            break
        paragraph.append(ln.strip())
    text = " ".join(paragraph)
    if len(paragraph) > 1:
        first = paragraph[0]
        end = next((i for i in range(len(first), len(text)) if text[i - 1] in ".:;"
                    and (i == len(text) or text[i] == " ")), len(text))
        text = text[:end]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _humanise(name: str) -> str:
    return name.removeprefix("test_").replace("_", " ").strip()


@dataclass
class ThreatTest:
    name: str
    line: int
    docstring: str
    raises: list[str]
    reasons: list[str]
    node_ids: dict[str, str] = field(default_factory=dict)  # outcome per parameter set
    controls: list[str] = field(default_factory=list)
    listed_by: list[str] = field(default_factory=list)  # every control listing it, any result

    @property
    def attack(self) -> str:
        return _first_line(self.docstring)

    @property
    def checks(self) -> str:
        """What must hold under the attack."""
        for ln in self.docstring.splitlines():
            if ln.strip().lower().startswith("property:"):
                return ln.strip()[len("property:"):].strip()
        claim = self.name.removeprefix("test_")
        claim = _humanise(claim.split("_if_", 1)[0]) if "_if_" in claim else _humanise(claim)
        outcome = []
        if self.raises:
            outcome.append("raises " + " or ".join(self.raises))
        if self.reasons:
            outcome.append(("reason " if len(self.reasons) == 1 else "reasons ")
                           + ", ".join(self.reasons))
        return claim + (": " + " with ".join(outcome) if outcome else "")

    @property
    def result(self) -> str:
        values = set(self.node_ids.values())
        if not values:
            return "not run"
        if values & {"failed", "error"}:
            return "failed"
        return "passed" if "passed" in values else "skipped"


@dataclass
class Adversary:
    module: str
    description: str
    tests: list[ThreatTest]
    collection_error: str = ""

    @property
    def title(self) -> str:
        text = re.sub(r"^adversar(?:y|ies)\s*:\s*", "", self.description, flags=re.IGNORECASE)
        return text[:1].upper() + text[1:] if text else self.module


def _expectations(func: ast.AST, helpers: Mapping[str, ast.AST],
                  depth: int = 0) -> tuple[list[str], list[str]]:
    """(exceptions in ``pytest.raises(...)``, ``AbortReason.X``-style reasons) that the test,
    or a module-level helper it calls, asserts."""
    raises: list[str] = []
    reasons: list[str] = []
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "raises" and node.args
                    and isinstance(f.value, ast.Name) and f.value.id == "pytest"):
                arg = node.args[0]
                items = arg.elts if isinstance(arg, ast.Tuple) else [arg]
                raises.extend(ast.unparse(e) for e in items)
            elif isinstance(f, ast.Name) and f.id in helpers and depth == 0:
                more_raises, more_reasons = _expectations(helpers[f.id], helpers, depth + 1)
                raises.extend(more_raises)
                reasons.extend(more_reasons)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in _REASON_ENUMS):
            reasons.append(node.attr)
    return list(dict.fromkeys(raises)), list(dict.fromkeys(reasons))


def scan_module(path: Path) -> tuple[str, list[ThreatTest]]:
    """(first line of the module docstring, its test functions in file order)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    helpers: dict[str, ast.AST] = {f.name: f for f in funcs if not f.name.startswith("test")}
    tests = [ThreatTest(f.name, f.lineno, ast.get_docstring(f) or "",
                        *_expectations(f, helpers))
             for f in funcs if f.name.startswith("test")]
    return _first_line(ast.get_docstring(tree)), tests


def collect(base: Path, suite: PytestRun, controls: ControlsRun) -> list[Adversary]:
    adversaries = []
    for path in sorted((base / THREAT_MODEL_DIR).glob("test_*.py")):
        module = path.relative_to(base).as_posix()
        description, tests = scan_module(path)
        for t in tests:
            t.node_ids = matching(f"{module}::{t.name}", suite.outcomes)
            fid = f"{module}::{t.name}"
            for r in controls.results:
                if any(function_id(listed) == fid for listed in r.control.tests):
                    t.listed_by.append(r.control.id)
                    if r.result == "caught" and any(function_id(f) == fid
                                                    for f in r.failed_tests):
                        t.controls.append(r.control.id)
        adversaries.append(Adversary(module, description, tests,
                                     suite.collection_errors.get(module, "")))
    return adversaries


# ---- writing -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


@dataclass
class ThreatModelReport:
    adversaries: list[Adversary]
    suite: PytestRun
    controls: ControlsRun
    repository: dict[str, Any]
    generated_at: str

    @property
    def tests(self) -> list[ThreatTest]:
        return [t for a in self.adversaries for t in a.tests]

    def counts(self) -> dict[str, int]:
        tests = self.tests
        return {
            "adversaries": len(self.adversaries),
            "tests": len(tests),
            "passed": sum(t.result == "passed" for t in tests),
            "failed": sum(t.result == "failed" for t in tests),
            "other": sum(t.result not in ("passed", "failed") for t in tests),
            "with_control": sum(bool(t.controls) for t in tests),
            "collection_errors": sum(bool(a.collection_error) for a in self.adversaries),
        }

    @property
    def ok(self) -> bool:
        c = self.counts()
        return (c["failed"] == 0 and c["other"] == 0 and c["collection_errors"] == 0
                and self.controls.all_caught)

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "repository": self.repository,
            "summary": {**self.counts(), "controls": self.controls.summary(), "ok": self.ok},
            "threat_model": {
                "directory": THREAT_MODEL_DIR,
                "seconds": round(self.suite.seconds, 1),
                "adversaries": [
                    {
                        "module": a.module,
                        "adversary": a.description,
                        "collection_error": a.collection_error or None,
                        "tests": [
                            {
                                "node_id": f"{a.module}::{t.name}",
                                "attack": {"test": t.name, "docstring": t.attack},
                                "property": t.checks,
                                "expects": {"raises": t.raises, "reasons": t.reasons},
                                "result": t.result,
                                "cases": t.node_ids,
                                "controls": t.controls,
                                "listed_by_controls": t.listed_by,
                            }
                            for t in a.tests
                        ],
                    }
                    for a in self.adversaries
                ],
            },
            "controls": self.controls.to_json(),
        }

    def markdown(self) -> str:
        c = self.counts()
        s = self.controls.summary()
        repo = self.repository
        lines = [
            "# Threat-model report",
            "",
            f"Commit `{repo['commit'][:12]}`"
            + (" **with uncommitted changes**" if repo["dirty"] else "")
            + f", generated {self.generated_at} by `secagg threat-model run`.",
            "",
            "## Summary",
            "",
            "| | |",
            "|---|---|",
            f"| Adversaries (one test module each) | {c['adversaries']} |",
            f"| Threat-model tests (attacks tried) | {c['tests']}: {c['passed']} passed, "
            f"{c['failed']} failed" + (f", {c['other']} not run or skipped" if c["other"] else "")
            + " |",
            f"| Weakened-build controls caught | {s['caught']} of {s['total']} "
            f"({s['percent']:.1f}%) |",
            f"| Threat-model tests shown able to fail by a control | {c['with_control']} of "
            f"{c['tests']} |",
            "",
        ]
        if self.ok:
            lines.append("Every attack in the suite was defeated, and every defence that a "
                         "control removes was caught by the tests listed for it.")
        else:
            lines.append("**Attention:**")
            lines.append("")
            if c["failed"] or c["other"] or c["collection_errors"]:
                lines.append(f"- {c['failed']} threat-model test(s) failed, {c['other']} did not "
                             f"run, {c['collection_errors']} module(s) failed to import.")
            for m in s["misses"]:
                lines.append(f"- Defence not covered by any failing test: {m['defence']} "
                             f"(control `{m['id']}`).")
            for x in s["invalid_controls"]:
                lines.append(f"- Control `{x['id']}` proves nothing as written: "
                             f"{_cell(x['detail'])}")
            for x in s["timeouts"]:
                lines.append(f"- Control `{x['id']}` timed out.")
        lines += [
            "",
            "How to read the tables: each row is one attack, tried by the test named after it. "
            "*Property checked* is what must hold under the attack (taken from the test name and "
            "the outcome it asserts). *Shown to fail by* lists the weakened-build controls under "
            "which the test fails: a copy of the code with that defence removed, on which the "
            "test caught the change. A test with nothing in that column has not been shown able "
            "to fail; it may still be a good test.",
            "",
            "## Adversaries",
        ]
        for n, a in enumerate(self.adversaries, 1):
            passed = sum(t.result == "passed" for t in a.tests)
            lines += ["", f"### {n}. {a.title}", "",
                      f"`{a.module}`: {len(a.tests)} attacks, {passed} defeated.", ""]
            if a.collection_error:
                lines += ["**The module failed to import; none of its tests ran.**", "",
                          "```", a.collection_error.strip()[-1500:], "```", ""]
            lines += ["| Attack | Property checked | Result | Shown to fail by |",
                      "|---|---|---|---|"]
            for t in a.tests:
                attack = _code(t.name) + (f"<br>{_cell(t.attack)}" if t.attack else "")
                cases = len(t.node_ids)
                result = t.result + (f" ({cases} cases)" if cases > 1 else "")
                if t.result != "passed":
                    result = f"**{result}**"
                shown = ", ".join(_code(i) for i in t.controls) or "-"
                lines.append(f"| {attack} | {_cell(t.checks)} | {result} | {shown} |")
        lines += self._controls_markdown()
        lines += [
            "",
            "## Reproducing",
            "",
            "```",
            "secagg threat-model run --out DIR          # this report",
            "secagg threat-model controls --only ID     # one control, with progress on stderr",
            "secagg threat-model controls --files PATH  # the controls of the files changed",
            "```",
            "",
            "Controls are defined in `tests/threat_model/controls.toml`; each runs in a "
            "throw-away copy of the repository (tracked and untracked, non-ignored files) with "
            "`python -m pytest -x -q -p no:cacheprovider` on the listed tests.",
            "",
        ]
        return "\n".join(lines)

    def _controls_markdown(self) -> list[str]:
        run = self.controls
        s = run.summary()
        listed = sorted({t for r in run.results for t in r.control.tests})
        bad = failing(run.baseline, listed) if run.baseline is not None else []
        lines = [
            "",
            "## Weakened-build controls",
            "",
            "Each control removes one defence from a copy of the code (a check disabled, a "
            "comparison flipped, a field dropped from associated data or a signed encoding, "
            "randomness made constant, ...) and runs the tests listed for it. The control is "
            "*caught* when one of them fails; *missed* means the tests still pass without the "
            "defence, so they do not prove it.",
            "",
            f"Baseline: {len(listed) - len(bad)} of {len(listed)} listed tests pass on the "
            f"unmodified code. Controls: {s['caught']} of {s['total']} caught "
            f"({s['percent']:.1f}%), {s['missed']} missed, {s['invalid']} invalid, "
            f"{s['timeout']} timed out; {run.seconds:.0f} s.",
            *([f"Flaky on the baseline (failed, then passed when run again; a control they "
               f"catch is run twice): {', '.join(f'`{t}`' for t in run.baseline.flaky)}."]
              if run.baseline is not None and run.baseline.flaky else []),
            "",
            "| Control | Defence removed | File | Result | Failing tests |",
            "|---|---|---|---|---|",
        ]
        for r in run.results:
            result = r.result if r.result == "caught" else f"**{r.result}**"
            if r.result == "caught":
                names = dict.fromkeys(function_id(f).split("::")[-1] for f in r.failed_tests)
                detail = ", ".join(_code(n) for n in names)
            else:
                detail = _cell(r.detail)
            lines.append(f"| `{r.control.id}` | {_cell(r.control.defence)} | "
                         f"`{r.control.file}` | {result} | {detail} |")
        if s["misses"]:
            lines += ["", "### Missed defences", ""]
            lines += [f"- `{m['id']}`: {m['defence']}" for m in s["misses"]]
        return lines


def build_report(root: Path, controls: Sequence[Control], *, jobs: int, timeout: float,
                 keep: bool = False, progress: TextIO | None = None,
                 settings: Mapping[str, Any] | None = None) -> ThreatModelReport:
    commit, dirty = revision(root)
    with Workspace(root, keep=keep) as ws:
        if progress is not None:
            print(f"workspace: {ws.dir} ({len(ws.files)} files, uncommitted work included)",
                  file=progress, flush=True)
        runner = ControlRunner(ws, jobs=jobs, timeout=timeout, progress=progress,
                               stop_at_first=False)
        runner.check_base()
        static = problems(ws.base, controls)
        listed = sorted({t for c in controls if c.id not in static for t in c.tests
                         if not t.startswith(THREAT_MODEL_DIR + "/")})
        if progress is not None:
            print(f"threat model: running {THREAT_MODEL_DIR}/ (and the other tests the "
                  f"controls list, as their baseline) ...", file=progress, flush=True)
        suite = run_suite(ws, [THREAT_MODEL_DIR, *listed], timeout=max(timeout, 1800.0))
        if progress is not None:
            print(f"threat model: {sum(v == 'passed' for v in suite.outcomes.values())} of "
                  f"{len(suite.outcomes)} test cases passed ({suite.seconds:.1f} s)",
                  file=progress, flush=True)
        controls_run = runner.run(controls, baseline=suite)
        controls_run.settings = dict(settings or {})
        adversaries = collect(ws.base, suite, controls_run)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return ThreatModelReport(adversaries, suite, controls_run,
                             {"root": str(root), "commit": commit, "dirty": dirty}, now)


def prepare_out(out_dir: Path) -> None:
    """Make the report's directory and check it takes files, before the suite runs: a bad
    --out (a file, a directory not writable) was said only after the whole run, lost."""
    from secagg.audit.controls import AuditError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".{REPORT_NAME}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AuditError(f"cannot write the report into {out_dir}: "
                         f"{e.strerror or type(e).__name__}") from None


def write_report(report: ThreatModelReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{REPORT_NAME}.md"
    js = out_dir / f"{REPORT_NAME}.json"
    md.write_text(report.markdown(), encoding="utf-8")
    js.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return md, js
