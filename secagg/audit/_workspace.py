"""Throw-away copies of the repository in which a defence can be removed.

The base copy holds the repository's tracked files plus untracked files git does not ignore
(so uncommitted work is audited too), never ``.venv``. Each control gets its own copy of the
base, with only the edited file rewritten, so the base stays pristine and controls can run side
by side. The copies are real copies, not hard links: a test that rewrote a tracked file in place
would have rewritten the base's file through the link, and every later copy with it. The
base's Python files are compiled once, and every copy gets their bytecode, checked against
its source's hash when imported (an edited file's is never used).

A runner killed with SIGKILL cannot remove its workspace. Each workspace names its owner (pid,
start time and pid namespace) in an ``owner`` file, and making a workspace first removes those
of owners that are gone; a ``--keep`` workspace has no owner file, so it is never removed.

Subprocesses run with the copy as working directory and as ``PYTHONPATH``: ``import secagg``
must resolve to the copy even though the package is installed editable. The runner checks
where a control's tests imported ``secagg`` and the edited module from (or, for one they did
not import, :meth:`check_imports` does), and fails loudly when it is not the copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from secagg.audit import _pytest_plugin
from secagg.audit.controls import AuditError

_EXCLUDED_TOP = {".venv", ".git"}
PREFIX = "secagg-controls-"
OWNER = "owner"


PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc, or None
    when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], fields[19]


def _namespace() -> str:
    return os.readlink(PROC / "self" / "ns" / "pid")


def _owner_text() -> str:
    """Who owns a workspace: this process's pid, start time and pid namespace (a pid means
    nothing in another namespace, and another process may take it once this one ends)."""
    pid = os.getpid()
    stat = _stat(pid)
    if stat is None:
        raise OSError("no /proc entry for this process")
    return f"{pid} {stat[1]} {_namespace()}"


def _owner_gone(text: str) -> bool:
    """Whether the process an owner file names has ended: no such pid, a zombie, or a pid
    another process took since (another start time). Nothing is judged where it cannot be
    told: no /proc, another pid namespace, an owner file that does not read as one."""
    parts = text.split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return False
    try:
        if parts[2] != _namespace():
            return False
        stat = _stat(int(parts[0]))
    except (OSError, IndexError):
        return False
    return stat is None or stat[0] == "Z" or stat[1] != parts[1]


MEMORY_DIR = Path("/dev/shm")  # noqa: S108 (a directory of our own is made in it, 0700)
_MEMORY_FREE = 1 << 30


def workspaces_dir(*, keep: bool = False) -> Path:
    """Where workspaces are made: the temporary directory when TMPDIR names one or the
    workspace is kept (``--keep``: what stays is not left in memory); else
    /dev/shm, a file system in memory, when it is a writable directory with a GiB free (a
    control's copy, some 560 files, took 0.85 s on this machine's disk and 0.12 s there: a
    third of a control's time); else the temporary directory."""
    if os.environ.get("TMPDIR") or keep:
        return Path(tempfile.gettempdir())
    try:
        free = os.statvfs(MEMORY_DIR)
        # (not one mounted noexec: a test may run a script of the copy)
        if MEMORY_DIR.is_dir() and os.access(MEMORY_DIR, os.W_OK | os.X_OK) \
                and not free.f_flag & os.ST_NOEXEC \
                and free.f_bavail * free.f_frsize >= _MEMORY_FREE:
            return MEMORY_DIR
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def sweep_stale(tmp: Path | None = None) -> list[Path]:
    """Remove the workspaces (under ``tmp``; by default in memory and in the temporary
    directory, wherever they may have been made) of runners that ended without removing them
    (SIGKILL); returns what was removed. Only this user's directories with an owner file
    naming a process that is gone are touched."""
    removed = []
    # defence: audit.stale-swept-wherever-made
    tops = [tmp] if tmp else list(dict.fromkeys([MEMORY_DIR, Path(tempfile.gettempdir())]))
    for candidate in sorted(p for top in tops for p in top.glob(PREFIX + "*")):
        try:
            if candidate.is_symlink() or not candidate.is_dir() \
                    or candidate.stat().st_uid != os.getuid():
                continue
            text = (candidate / OWNER).read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # no owner file: a --keep workspace, or one being made
        # defence: audit.stale-workspaces-are-swept
        if _owner_gone(text):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def repository_root(start: Path) -> Path:
    """The git work tree containing ``start``."""
    try:
        out = _git(start, "rev-parse", "--show-toplevel")
    except AuditError:
        raise AuditError(f"{start} is not inside a git work tree") from None
    return Path(out.strip())


def _git(cwd: Path, *args: str) -> str:
    git = shutil.which("git")
    if git is None:
        raise AuditError("git is not installed")
    proc = subprocess.run([git, "-C", str(cwd), *args], capture_output=True, text=True,  # noqa: S603
                          check=False)
    if proc.returncode != 0:
        raise AuditError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def revision(root: Path) -> tuple[str, bool]:
    """(HEAD commit, whether the work tree differs from it)."""
    commit = _git(root, "rev-parse", "HEAD").strip()
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=normal").strip())
    return commit, dirty


def audited_files(root: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files that exist, relative to ``root``."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    files = []
    for rel in sorted(set(out.split("\0")) - {""}):
        parts = Path(rel).parts
        if parts[0] in _EXCLUDED_TOP or "__pycache__" in parts:
            continue
        path = root / rel
        if path.is_file() or path.is_symlink():  # a tracked file deleted in the work tree is gone
            files.append(rel)
    return files


def _compile(base: Path, files: list[str]) -> list[str]:
    """Compile the base's Python files once, for every copy (relative paths of the bytecode
    written): each control's tests compiled the whole project anew in their fresh copy
    (PYTHONDONTWRITEBYTECODE, or empty caches), most of a second a control. The bytecode is
    checked against its source's hash at each import, never its time stamp: a control's
    edited file (or one a test rewrote) is compiled from what it holds, whatever its size
    and modification time. None with a bytecode prefix (PYTHONPYCACHEPREFIX: outside)."""
    if sys.pycache_prefix:
        return []
    # (a pass hook changes what pytest's rewrite makes: then each control rewrites its own;
    # pytest may read a configuration file in any directory above the tests it runs)
    hooked = any("enable_assertion_pass_hook" in (base / rel).read_text(errors="replace")
                 for rel in files if Path(rel).name in _PYTEST_CONFIGS
                 and (base / rel).is_file())
    written = []
    for rel in files:
        src = base / rel
        if not rel.endswith(".py") or src.is_symlink():
            continue
        cache = Path(importlib.util.cache_from_source(str(src)))
        try:
            # defence: audit.copied-bytecode-checked-against-its-source
            py_compile.compile(str(src), cfile=str(cache), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError, ValueError):
            continue  # (compiled, or refused, by the import that needs it, as before)
        written.append(cache.relative_to(base).as_posix())
        rewritten = _rewritten_bytecode(src) if _pytest_rewrites(rel) and not hooked else None
        if rewritten is not None:
            written.append(rewritten.relative_to(base).as_posix())
    return written


_PYTEST_CONFIGS = ("pyproject.toml", "pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg")


def _pytest_rewrites(rel: str) -> bool:
    """Whether pytest may import ``rel`` with its asserts rewritten (a test module, a
    conftest, a helper in the test tree): its bytecode is pytest's own, not the import
    system's. One made for a file pytest does not rewrite is never read."""
    parts = Path(rel).parts
    return parts[-1] == "conftest.py" or parts[0] == "tests" or parts[-1].startswith("test_")


def _rewritten_bytecode(src: Path) -> Path | None:
    """Write the bytecode pytest reads for ``src`` with its asserts rewritten (pytest's own
    cache file; the path written, or None). Each control's pytest rewrote and compiled every
    test module it ran, three quarters of a second a control, as none could write the cache
    (PYTHONDONTWRITEBYTECODE). The file holds its source's hash, which pytest checks before
    it uses it (an edited test module is rewritten from what it holds), and is named for the
    pytest version that made it. pytest's internals: where they are not what this expects,
    nothing is written and each control rewrites its tests as before."""
    try:
        from _pytest.assertion import rewrite

        # (no configuration: as pytest rewrites without the assertion pass hook, which
        # _compile checks the repository does not turn on)
        source_hash, code = rewrite._rewrite_test(src, None)  # type: ignore[arg-type]
        pyc = rewrite.get_cache_dir(src) / (src.name[:-3] + rewrite.PYC_TAIL)
        pyc.parent.mkdir(parents=True, exist_ok=True)
        with open(pyc, "wb") as fp:
            rewrite._write_pyc_fp(fp, source_hash, code)
        # only a file pytest checks against its source's hash (pytest 8 wrote one checked
        # by the source's time stamp and size, which an edit of the same size in the same
        # second passes): any other is removed, and each control rewrites its tests
        # defence: audit.rewritten-bytecode-only-hash-checked
        if pyc.read_bytes()[4:8] != b"\x03\x00\x00\x00":
            pyc.unlink()
            return None
    except Exception:  # (an optimisation only: without it, as before)
        return None
    return pyc


PLUGIN_MODULE = "secagg_audit_outcomes"
CI_VARIABLES = ("CI", "BUILD_NUMBER")  # what pytest reads to decide it runs on CI


def subprocess_env(copy: Path, extra: dict[str, str] | None = None,
                   plugin_dir: Path | None = None) -> dict[str, str]:
    """The environment of a subprocess in ``copy``: PYTHONPATH is the copy (then the directory
    holding the outcome-recording pytest plugin, which imports nothing from the copy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + str(plugin_dir) if plugin_dir else "")
    env.pop("PYTEST_ADDOPTS", None)  # the copy's own pytest configuration only
    # On CI (CI or BUILD_NUMBER set) pytest explains a failed assert in full, without
    # truncation: for two tuples of ciphertext bytes that is a quadratic ndiff that ran past
    # the 300 s timeout, so a caught control came out "timeout". A control needs only the
    # outcome, so its pytest runs as it does on a desk.
    for name in CI_VARIABLES:
        env.pop(name, None)
    env.update(extra or {})
    return env


def _module_name(rel: str) -> str | None:
    """The importable module a repository file is, if it is one (``secagg/hazmat/aead.py``)."""
    path = Path(rel)
    if path.suffix != ".py":
        return None
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts else None


def _inside(top: Path, dest: Path, rel: str) -> None:
    """Refuse to write ``dest`` unless its directory is inside ``top``: a file listed under a
    directory the work tree has as a link (``secagg/sub -> ../../elsewhere``) was copied
    through the link, over a file outside the repository and the workspace."""
    # defence: audit.copies-stay-in-the-workspace
    if not dest.parent.resolve().is_relative_to(top.resolve()):
        raise AuditError(f"{rel} is reached through a symbolic link: a control edits a file "
                         "of the repository, never one a link leads to")


class Workspace:
    """A temporary directory with the base copy and one copy per control."""

    def __init__(self, root: Path, *, keep: bool = False) -> None:
        self.root = root
        self.keep = keep
        self.files = audited_files(root)
        sweep_stale()  # (first: what it frees in memory counts toward where this one goes)
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=workspaces_dir(keep=keep)))
        self.base = self.dir / "base"
        # The plugin runs beside the copy, not from it: an edit to the copy cannot break it.
        self.plugin_dir = self.dir / "plugin"
        self.plugin_dir.mkdir()
        shutil.copy(Path(_pytest_plugin.__file__), self.plugin_dir / f"{PLUGIN_MODULE}.py")
        try:
            # (none for a --keep workspace: what the user keeps is never swept, even if its
            # runner is killed; written whole or not at all, so a sweep never reads half)
            # defence: audit.kept-workspace-never-swept
            if not keep:
                with contextlib.suppress(OSError):  # (no /proc: never swept, as before)
                    (self.dir / f"{OWNER}.new").write_text(_owner_text(), encoding="ascii")
                    os.replace(self.dir / f"{OWNER}.new", self.dir / OWNER)
            real_root = root.resolve()
            for rel in self.files:
                dest = self.base / rel
                _inside(self.base, dest, rel)  # (before mkdir: it would make directories there)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = root / rel
                target = Path(os.readlink(src)) if src.is_symlink() else None
                # an absolute link into the repository (tests/x -> /repo/README.md) led every
                # copy back into the real repository, and a test wrote there through it: in
                # the copies it leads to the copy's own file
                # defence: audit.links-into-the-repository-stay-in-the-copy
                if target is not None and target.is_absolute() \
                        and target.resolve().is_relative_to(real_root):
                    dest.symlink_to(os.path.relpath(target.resolve(), (real_root / rel).parent))
                    continue
                shutil.copy2(src, dest, follow_symlinks=False)
            self.bytecode = _compile(self.base, self.files)
        except BaseException:
            self.close()  # (the workspace is nobody's yet: no with-block will remove it)
            raise

    def pristine_copy(self, name: str) -> Path:
        """A copy of the base, unedited: where a baseline runs. It ran in the base itself, so
        a test that rewrote a repository file changed what every later control tested (an
        auditor's finding: a control that removed nothing came out caught)."""
        copy = self.dir / "controls" / name
        made: set[Path] = set()  # (each directory checked and made once: a tenth of a second)
        for rel in [*self.files, *self.bytecode]:
            src, dest = self.base / rel, copy / rel
            if dest.parent not in made:
                _inside(copy, dest, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            # a copy, never a hard link: a test writing a file in place must not reach the base
            # defence: audit.copies-are-not-links
            shutil.copy2(src, dest, follow_symlinks=False)
        return copy

    def make_copy(self, name: str, edited_file: str, edited_text: str) -> Path:
        """A copy of the base in which only ``edited_file`` is rewritten."""
        copy = self.pristine_copy(name)
        target = copy / edited_file
        # a file reached through a link in the repository (a directory linked to /etc, or
        # the file itself a link) was rewritten where the link led: outside the copy
        # defence: audit.edit-stays-in-the-copy
        if target.is_symlink() or not target.parent.resolve().is_relative_to(copy.resolve()):
            raise AuditError(f"{edited_file} is reached through a symbolic link: a control "
                             "edits a file of the repository, never one a link leads to")
        mode = target.stat().st_mode if target.exists() else 0o644
        target.unlink(missing_ok=True)  # (a fresh file: the base's mode is set below)
        target.write_text(edited_text, encoding="utf-8")
        target.chmod(mode)
        return copy

    def remove_copy(self, copy: Path) -> None:
        if not self.keep:
            shutil.rmtree(copy, ignore_errors=True)

    def check_imports(self, copy: Path, edited_file: str | None = None,
                      timeout: float = 120.0) -> str | None:
        """Import ``secagg`` (and the edited module) in ``copy`` the way the tests will.

        Returns None when both come from the copy, or the import error when the edited module
        no longer imports. Raises :class:`AuditError` when a module resolves outside the copy:
        the tests would then run against code that is not the one being audited.
        """
        modules = self.modules_to_check(edited_file)
        # (its lifeline, as a control's pytest has: an edited module that loops at import
        # outlived a runner killed with SIGKILL, at full CPU, for ever)
        life_read, life_write = os.pipe()
        script = (
            "import importlib, os, sys, threading\n"
            f"def _watch(fd={life_read}):\n"
            "    while os.read(fd, 1):\n"
            "        pass\n"
            "    os._exit(1)\n"
            "threading.Thread(target=_watch, daemon=True).start()\n"
            f"for name in {modules!r}:\n"
            "    path = importlib.import_module(name).__file__\n"
            "    sys.stdout.write(f'{name}={path}\\n')\n"
        )
        try:
            # defence: audit.import-check-ends-with-the-runner
            proc = subprocess.run(  # noqa: S603 (our own interpreter, our own script)
                [sys.executable, "-c", script], cwd=copy, env=subprocess_env(copy),
                capture_output=True, text=True, timeout=timeout, check=False,
                pass_fds=(life_read,))
        except subprocess.TimeoutExpired:
            return f"importing {', '.join(modules)} took more than {timeout:.0f} s"
        finally:
            os.close(life_read)
            os.close(life_write)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return lines[-1] if lines else f"import failed with exit code {proc.returncode}"
        resolved = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        self.check_resolved(copy, resolved, modules)
        return None

    @staticmethod
    def modules_to_check(edited_file: str | None) -> list[str]:
        """``secagg`` and the edited module, if the edited file is one."""
        modules = ["secagg"]
        edited = _module_name(edited_file) if edited_file else None
        if edited and edited != "secagg":
            modules.append(edited)
        return modules

    @staticmethod
    def check_resolved(copy: Path, resolved: dict[str, str], modules: list[str]) -> None:
        """AuditError unless each of ``modules`` was imported from a file in ``copy``."""
        for name in modules:
            where = Path(resolved.get(name, "")).resolve()
            # defence: audit.imports-resolve-in-the-copy
            if not where.is_relative_to(copy.resolve()):
                raise AuditError(
                    f"in the copy {copy}, 'import {name}' resolved to {where}, outside the copy: "
                    "the tests would not see the edit (is PYTHONPATH honoured?)"
                )

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
