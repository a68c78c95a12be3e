"""Audit tooling: weakened-build controls and the threat-model report.

A suite that still passes with a defence removed proves nothing. For each defence,
``tests/threat_model/controls.toml`` holds the edit that removes it and the tests that must then
fail; :class:`ControlRunner` applies each edit in a throw-away copy of the repository and runs
those tests. Run it as ``secagg threat-model controls`` or ``secagg threat-model run --out DIR``.
Nothing here is imported by the library itself, and pytest is only ever run as a subprocess.
"""

from secagg.audit.controls import (
    CONTROLS_FILE,
    AuditError,
    Control,
    ControlError,
    Edit,
    load_controls,
    parse_controls,
    problems,
    scan_markers,
)
from secagg.audit.runner import ControlResult, ControlRunner, ControlsRun

__all__ = [
    "CONTROLS_FILE",
    "AuditError",
    "Control",
    "ControlError",
    "ControlResult",
    "ControlRunner",
    "ControlsRun",
    "Edit",
    "load_controls",
    "parse_controls",
    "problems",
    "scan_markers",
]
