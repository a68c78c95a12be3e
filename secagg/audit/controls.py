"""The controls file: for each defence, the edit that removes it and the tests that must fail.

A suite that still passes with a defence removed proves nothing. Each ``[[control]]`` entry of
``tests/threat_model/controls.toml`` names one defence, the exact source text that implements
it (``find``, which must occur exactly once in ``file``), the edit that removes it
(``replace``) and the tests that must fail once the edit is applied. When removing a defence
needs the same change in two places (a field dropped on both the sealing and the opening
side), ``edits = [{ find = "...", replace = "..." }, ...]`` replaces ``find``/``replace``; the
edits are applied in order and each must match exactly once.

Source lines that implement a covered defence carry a ``# defence: <id>`` comment, so that
"every marked defence has a control" is checkable (:func:`scan_markers`).

This module only reads and checks the file; :mod:`secagg.audit.runner` runs the controls.
"""

from __future__ import annotations

import ast
import builtins
import io
import keyword
import re
import symtable
import tokenize
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

CONTROLS_FILE = "tests/threat_model/controls.toml"
MAX_TIMEOUT = 1e6  # seconds a control may take (what the runner's clock can wait)

# lower-case words joined by '-', at least two of them joined by '.': "hazmat.aead.random-nonce"
ID_PATTERN = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*(?:\.[a-z0-9]+(?:[-_][a-z0-9]+)*)+")
# the ids, comma-separated; what follows them on the line (a reason in parentheses) is prose
_MARKER = re.compile(r"#\s*defence:\s*([\w.-]+(?:\s*,\s*[\w.-]+)*)")
_NODE_ID = re.compile(r"(?P<path>[^:\[\]]+\.py)(?P<names>(?:::[A-Za-z_]\w*)+)(?P<params>\[.*\])?")
_REQUIRED = ("id", "defence", "file", "tests")
_OPTIONAL = ("find", "replace", "edits", "timeout")


class AuditError(Exception):
    """The audit cannot be run as asked (bad controls file, broken workspace, failed baseline)."""


class ControlError(AuditError):
    """One control cannot be applied as written (its find text does not match exactly once)."""


@dataclass(frozen=True)
class Edit:
    find: str
    replace: str


@dataclass(frozen=True)
class Control:
    """One defence, the edit that removes it, and the tests that must fail without it."""

    id: str
    defence: str
    file: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    timeout: float | None = None
    line: int = field(default=0, compare=False)  # where the entry starts in the controls file

    def apply(self, source: str) -> str:
        """``source`` with the defence removed; :class:`ControlError` unless every find text
        occurs exactly once and the result differs from ``source``."""
        text = source
        for n, edit in enumerate(self.edits, 1):
            count = text.count(edit.find)
            if count != 1:
                which = f"find text #{n}" if len(self.edits) > 1 else "find text"
                raise ControlError(
                    f"{self.id}: {which} occurs {count} times in {self.file}, must be exactly once"
                )
            text = text.replace(edit.find, edit.replace)
        if text == source:
            raise ControlError(f"{self.id}: the edit does not change {self.file}")
        return text


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise AuditError(f"{where}: '{key}' must be a non-empty string")
    return value


def _edits(entry: Mapping[str, Any], where: str) -> tuple[Edit, ...]:
    has_pair = "find" in entry or "replace" in entry
    if has_pair == ("edits" in entry):
        raise AuditError(f"{where}: give either 'find' and 'replace', or 'edits', not both")
    raw: list[Any] = [entry] if has_pair else entry["edits"]
    if not isinstance(raw, list) or not raw:
        raise AuditError(f"{where}: 'edits' must be a non-empty list of {{find, replace}} tables")
    edits = []
    for item in raw:
        if not isinstance(item, dict) or (not has_pair and set(item) != {"find", "replace"}):
            raise AuditError(f"{where}: each edit is a table with exactly 'find' and 'replace'")
        find, replace = item.get("find"), item.get("replace")
        if not isinstance(find, str) or not find or not isinstance(replace, str):
            raise AuditError(f"{where}: 'find' must be a non-empty string, 'replace' a string")
        edits.append(Edit(find, replace))
    return tuple(edits)


def split_node_id(node_id: str) -> tuple[str, tuple[str, ...]]:
    """``("tests/x.py", ("TestClass", "test_f"))`` for ``tests/x.py::TestClass::test_f[p]``."""
    m = _NODE_ID.fullmatch(node_id)
    if m is None:
        raise AuditError(f"'{node_id}' is not a pytest node id (path.py::test_name)")
    return m["path"], tuple(m["names"].split("::")[1:])


def function_id(node_id: str) -> str:
    """The node id without its parameter suffix: one entry per test function."""
    path, names = split_node_id(node_id)
    return "::".join((path, *names))


def _control(entry: Any, index: int, lines: Sequence[int]) -> Control:
    where = f"control #{index + 1}"
    if not isinstance(entry, dict):
        raise AuditError(f"{where}: must be a table")
    if isinstance(entry.get("id"), str):
        where = f"control '{entry['id']}'"
    unknown = set(entry) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise AuditError(f"{where}: unknown keys {sorted(unknown)}")
    control_id = _string(entry, "id", where)
    if not ID_PATTERN.fullmatch(control_id):
        raise AuditError(f"{where}: id must be dotted lower-case words, e.g. 'hazmat.aead.nonce'")
    file = _string(entry, "file", where)
    posix = PurePosixPath(file)
    file = posix.as_posix()  # ("./secagg/x.py" is secagg/x.py: --files selects it by that)
    if posix.is_absolute() or ".." in posix.parts or "\\" in file:
        raise AuditError(f"{where}: 'file' must be a path relative to the repository root")
    tests = entry.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise AuditError(f"{where}: 'tests' must be a non-empty list of pytest node ids")
    for t in tests:
        split_node_id(t)
    timeout = entry.get("timeout")
    # (inf or 1e10 was a traceback from the runner; nan was taken)
    # defence: audit.control-timeout-finite
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout <= MAX_TIMEOUT):
        raise AuditError(f"{where}: 'timeout' must be a positive, finite number of seconds "
                         f"(at most {MAX_TIMEOUT:.0f})")
    return Control(
        id=control_id,
        defence=_string(entry, "defence", where),
        file=file,
        edits=_edits(entry, where),
        tests=tuple(tests),
        timeout=float(timeout) if timeout is not None else None,
        line=lines[index] if index < len(lines) else 0,
    )


def parse_controls(text: str, source: str = CONTROLS_FILE) -> list[Control]:
    """The controls in ``text`` (TOML), checked for shape and unique ids."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"{source}: {e}") from None
    unknown = set(data) - {"control"}
    if unknown:
        raise AuditError(f"{source}: unknown top-level keys {sorted(unknown)}")
    entries = data.get("control", [])
    if not isinstance(entries, list):
        raise AuditError(f"{source}: 'control' must be an array of tables ([[control]])")
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip() == "[[control]]"]
    # (an empty or mistyped file ran nothing and reported 100% caught, status 0)
    # defence: audit.controls-file-not-empty
    if not entries:
        raise AuditError(f"{source}: no controls ([[control]] tables) in it")
    controls = [_control(entry, i, lines) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for c in controls:
        if c.id in seen:
            raise AuditError(f"{source}: duplicate control id '{c.id}'")
        seen.add(c.id)
    return controls


def load_controls(path: Path) -> list[Control]:
    # (a FIFO was waited on for ever; a file not UTF-8 was "UnicodeDecodeError: 'utf-8'
    # codec can't decode byte 0xff")
    # defence: audit.controls-file-regular-utf8
    if path.exists() and not path.is_file():
        raise AuditError(f"cannot read the controls file {path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AuditError(f"cannot read the controls file {path}: "
                         f"{e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise AuditError(f"cannot read the controls file {path}: not UTF-8 text") from None
    return parse_controls(text, str(path))


# ---- checks that need the repository (cheap: no subprocess) ----------------------------------


class DefinedTests:
    """Which test functions each test file defines, by a cheap AST scan (cached per file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._defined: dict[str, set[tuple[str, ...]] | None] = {}

    def _scan(self, path: str) -> set[tuple[str, ...]] | None:
        try:
            tree = ast.parse((self.root / path).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            return None
        names: set[tuple[str, ...]] = set()
        funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
        for node in tree.body:
            if isinstance(node, funcs):
                names.add((node.name,))
            elif isinstance(node, ast.ClassDef):
                names.update((node.name, m.name) for m in node.body if isinstance(m, funcs))
        return names

    def defines(self, node_id: str) -> bool:
        path, names = split_node_id(node_id)
        if path not in self._defined:
            self._defined[path] = self._scan(path)
        defined = self._defined[path]
        return defined is not None and names in defined


_DUNDERS = frozenset({"__file__", "__name__", "__doc__", "__spec__", "__builtins__",
                      "__package__", "__loader__", "__path__", "__debug__", "__qualname__",
                      "__module__", "__class__", "__annotations__", "__dict__"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code_lines(text: str) -> list[str]:
    """``text``'s lines without comments, trailing blanks or empty lines (indentation kept:
    in Python it is code). Quotes are followed within a line, so a '#' in a string stays."""
    kept = []
    for line in text.splitlines():
        quote, i, cut = "", 0, len(line)
        while i < len(line):
            ch = line[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif line.startswith(quote, i):
                    i += len(quote) - 1
                    quote = ""
            elif ch == "#":
                cut = i
                break
            elif ch in "'\"":
                quote = ch * 3 if line.startswith(ch * 3, i) else ch
                i += len(quote) - 1
            i += 1
        code = line[:cut].rstrip()
        if code:
            kept.append(code)
    return kept


def code_problems(path: str, source: str, edits: Sequence[Edit], edited: str,
                  words: dict[str, set[str] | None] | None = None) -> list[str]:
    """What makes an edit of a Python file prove nothing: it does not parse; it changes no
    code (a comment or blank lines only: a flaky test then "caught" it); or it reads a name
    the file never mentions and the edit does not bind (``x < zero``: the code then raises
    NameError wherever it runs, and a test of the happy path "caught" a defence it never
    tests). ``words``: the names the unedited files mention, by path (a cache)."""
    try:
        ast.parse(edited, path)
        symtable.symtable(edited, path, "exec")  # (what the compiler refuses past the parser)
    except SyntaxError as e:
        return [f"the edited {path} does not parse: {e.msg} (line {e.lineno})"]
    # defence: audit.edit-changes-code
    if all(_code_lines(e.find) == _code_lines(e.replace) for e in edits):
        return [f"the edit changes no code in {path} (a comment or blank lines only)"]
    # the names the edits' code reads (a word in a string, an attribute, a keyword argument
    # is no name: the symbol table holds only those the code reads or binds)
    names = {w for e in edits for w in _WORD.findall(e.replace)} - set(dir(builtins)) - (
        _DUNDERS | set(keyword.kwlist))
    if not names:
        return []
    # the names the unedited file reads where nothing binds them (a name made some way the
    # symbol table cannot see: not the edit's doing), by path (a cache)
    cache = {} if words is None else words
    if path not in cache:
        try:
            tree = ast.parse(source, path)
            cache[path] = None if _star_import(tree) else _unbound_reads(source, path)
        except SyntaxError:
            cache[path] = None
    before = cache[path]
    after = ast.parse(edited, path)
    if before is None or _star_import(after):  # (a star import's names are unknown)
        return []
    # Every read the edit makes, whether the file mentions the name elsewhere or not: a
    # local of another function read here (an auditor's finding: `nonce`, a local of seal,
    # read in open_sealed, passed as a name the file mentions, and its NameError "caught").
    # defence: audit.edit-reads-no-undefined-name
    unknown = sorted((_unbound_reads(edited, path) & (names - _annotation_only(after)))
                     - before)
    if unknown:
        return [f"the edit reads {', '.join(unknown)} where {path} does not bind it (the "
                "code would raise NameError, not run without the defence)"]
    # a local read where its function has not bound it yet (`if n > limit:` with `limit`
    # assigned further down): UnboundLocalError wherever it runs, as above
    # defence: audit.edit-reads-no-local-before-assignment
    # (the unedited file's, by path: a cache; the edited one's, in the functions the edits
    # changed: the whole check of every control took twice as long)
    key = f"{path}\0early"
    if key not in cache:
        cache[key] = _reads_before_assignment(ast.parse(source, path))
    early = sorted(_reads_before_assignment(after, names, _edited_lines(edited, edits))
                   - (cache[key] or set()))
    if early:
        return [f"the edit reads {', '.join(early)} before its function assigns it (the "
                "code would raise UnboundLocalError, not run without the defence)"]
    return []


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
           ast.SetComp, ast.DictComp, ast.GeneratorExp)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)


def _edited_lines(edited: str, edits: Sequence[Edit]) -> set[int]:
    """The lines of ``edited`` that hold the edits' replacement text."""
    lines: set[int] = set()
    for e in edits:
        at = edited.find(e.replace) if e.replace else -1
        while at >= 0:
            first = edited.count("\n", 0, at) + 1
            lines.update(range(first, first + e.replace.count("\n") + 1))
            at = edited.find(e.replace, at + 1)
    return lines


def _reads_before_assignment(tree: ast.AST, names: set[str] | None = None,
                             lines: set[int] | None = None) -> set[str]:
    """Which of ``names`` some function reads as a local (its body binds the name, and no
    ``global`` or ``nonlocal`` says otherwise) where no binding can have run yet: every
    binding of it in the function comes after the read in the source, and no loop holds
    both. Statements run in source order but for loops, so such a read raises
    UnboundLocalError the first time it runs. A binding counts where it takes effect: an
    assignment after its value (``n = n + 1`` reads ``n`` first)."""
    return {name for func in ast.walk(tree)
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            and (lines is None or any(func.lineno <= n <= (func.end_lineno or func.lineno)
                                      for n in lines))
            for name in _early_reads(func, names)}


def _early_reads(func: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
                 names: set[str] | None) -> set[str]:
    """:func:`_reads_before_assignment` for one function."""
    found: set[str] = set()
    args = func.args
    params = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs,
                              *(x for x in (args.vararg, args.kwarg) if x))}
    body = func.body if isinstance(func.body, list) else [func.body]
    declared: set[str] = set()
    binds: dict[str, list[tuple[int, int]]] = {}
    reads: list[tuple[str, tuple[int, int], list[ast.AST]]] = []

    def bind(name: str, where: tuple[int, int]) -> None:
        binds.setdefault(name, []).append(where)

    def visit(node: ast.AST, loops: list[ast.AST], late: tuple[int, int] | None) -> None:
        """``late``: where the bindings under ``node`` take effect, if not where they
        stand (an assignment's targets: after its value)."""
        if isinstance(node, ast.Global | ast.Nonlocal):
            declared.update(node.names)
        elif isinstance(node, ast.Name):
            where = (node.lineno, node.col_offset)
            if isinstance(node.ctx, ast.Load):
                reads.append((node.id, where, loops))
            else:
                bind(node.id, max(where, late or where))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for a in node.names:
                bind((a.asname or a.name).partition(".")[0], _end(node))
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) \
                and node.name:
            bind(node.name, (node.lineno, node.col_offset))
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bind(node.rest, (node.lineno, node.col_offset))
        if isinstance(node, _SCOPES):
            # its name is bound here; what is inside is another scope's (but a
            # comprehension's walrus, which binds here: counted where it stands)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bind(node.name, (node.lineno, node.col_offset))
            for sub in ast.walk(node):
                if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                    bind(sub.target.id, (sub.lineno, sub.col_offset))
            return
        inner = [*loops, node] if isinstance(node, _LOOPS) else loops
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.NamedExpr) \
                and value is not None:
            # the value first; the targets bind once it is computed
            visit(value, inner, late)
            for child in ast.iter_child_nodes(node):
                if child is not value:
                    visit(child, inner, max(_end(value), late or _end(value)))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner, late)

    for stmt in body:
        visit(stmt, [], None)
    for name, where, loops in reads:
        if (names is not None and name not in names) or name in params or name in declared \
                or name not in binds:
            continue
        if all(b > where for b in binds[name]) and not any(
                _holds(loop, b) for loop in loops for b in binds[name]):
            found.add(name)
    return found


def _end(node: ast.AST) -> tuple[int, int]:
    return (getattr(node, "end_lineno", 0) or 0, getattr(node, "end_col_offset", 0) or 0)


def _holds(node: ast.AST, where: tuple[int, int]) -> bool:
    """Whether ``where`` (a line and column) lies within ``node``'s source."""
    start = (node.lineno, node.col_offset)  # type: ignore[attr-defined]
    end = (node.end_lineno or 0, node.end_col_offset or 0)  # type: ignore[attr-defined]
    return start <= where <= end


def _star_import(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
               for n in ast.walk(tree))


def _annotation_only(tree: ast.Module) -> set[str]:
    """Names read only in annotations Python never evaluates: a local variable's (in a
    function), and every one under ``from __future__ import annotations``. (An argument's or
    a module-level one is evaluated otherwise: a missing name there is a NameError.)"""
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                    and any(a.name == "annotations" for a in n.names) for n in tree.body)
    notes: list[ast.AST] = []
    for node in ast.walk(tree):
        if postponed:
            notes += [x for x in (getattr(node, "annotation", None),
                                  getattr(node, "returns", None)) if isinstance(x, ast.AST)]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            notes += [n.annotation for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, ast.AnnAssign)]
    in_notes = {id(n) for note in notes for n in ast.walk(note)}
    inside: set[str] = set()
    outside: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            (inside if id(n) in in_notes else outside).add(n.id)
    return inside - outside


def _without_type_checking(source: str, path: str) -> str:
    """``source`` with the bodies of its top-level ``if TYPE_CHECKING:`` (or
    ``typing.TYPE_CHECKING``) blocks emptied: what binds names when the module runs."""
    tree = ast.parse(source, path)
    changed = False
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            assert isinstance(node, ast.If)
            node.body, changed = [ast.Pass()], True
    return ast.unparse(tree) if changed else source


def _unbound_reads(source: str, path: str, names: set[str] | None = None) -> set[str]:
    """Which of ``names`` the code reads in a scope that cannot see a binding of it.

    Scope by scope (Python's own symbol table), not file-wide: a name bound in one function
    and read in another raises NameError where it is read, just as a name bound nowhere. A
    read is bound when its scope binds the name (an assignment, an argument, an import, a
    definition, ``except ... as``, a match capture), when an enclosing function does (a
    free variable), or, for a global, when the module does (at its top level, or in a
    function declaring it ``global``).
    """
    top = symtable.symtable(source, path, "exec")
    tables, i = [top], 0
    while i < len(tables):
        tables.extend(tables[i].get_children())
        i += 1
    # what the module binds when it runs: not what only `if TYPE_CHECKING:` binds (the
    # symbol table counts both, and an edit reading such a name passed, to raise NameError)
    # defence: audit.type-checking-names-unbound
    runtime = symtable.symtable(_without_type_checking(source, path), path, "exec")
    module_bound = {s.get_name() for s in runtime.get_symbols() if s.is_local()}
    for table in tables[1:]:
        module_bound |= {s.get_name() for s in table.get_symbols()
                         if s.is_declared_global() and (s.is_assigned() or s.is_imported())}
    unbound = set()
    for table in tables:
        for sym in table.get_symbols():
            # a read of a name its scope binds, or an enclosing function binds (free), is
            # seen; any other is a global's, seen if the module binds it
            if (names is None or sym.get_name() in names) and sym.is_referenced() \
                    and sym.is_global() and sym.get_name() not in module_bound:
                unbound.add(sym.get_name())
    return unbound


def problems(root: Path, controls: Iterable[Control]) -> dict[str, list[str]]:
    """Per control id, what makes it unusable: a missing file, a find text that does not match
    exactly once, an edit that no longer parses, changes no code or reads a name the file
    never defines (:func:`code_problems`), a listed test that does not exist."""
    index = DefinedTests(root)
    found: dict[str, list[str]] = {}
    words: dict[str, set[str] | None] = {}
    for c in controls:
        issues = found.setdefault(c.id, [])
        try:
            source = (root / c.file).read_text(encoding="utf-8")
        except OSError:
            issues.append(f"file {c.file} does not exist")
        else:
            try:
                edited = c.apply(source)
            except ControlError as e:
                issues.append(str(e).removeprefix(f"{c.id}: "))
            else:
                if c.file.endswith(".py"):
                    issues.extend(code_problems(c.file, source, c.edits, edited, words))
        issues.extend(f"listed test {t} is not defined" for t in c.tests if not index.defines(t))
    return {k: v for k, v in found.items() if v}


@dataclass(frozen=True)
class Marker:
    file: str
    line: int
    control_id: str


def scan_markers(root: Path, package: str = "secagg") -> list[Marker]:
    """Every ``# defence: <id>[, <id>...]`` comment in the package's Python sources (comments
    only: a docstring that mentions the syntax is not a marker)."""
    markers = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8")
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            m = _MARKER.search(tok.string)
            if m:
                for ident in m[1].split(","):
                    markers.append(Marker(rel, tok.start[0], ident.strip()))
    return markers
