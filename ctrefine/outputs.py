"""How ctrefine writes: atomically, readable as the umask says, and never over what it did not create.

* :func:`atomic_file` / :func:`atomic_dir` -- build under a temporary name beside the target, rename
  when complete: a crash or Ctrl-C never leaves a half-written file under the final name. The result
  gets the permissions a plainly created file or folder would get under the current umask (temporary
  files are created private; results are not).
* :func:`check_writable` -- the place a command will write to can be created and written, checked
  *before* the work starts (one-line error instead of a traceback after minutes of work).
* :func:`folder_lock` -- one ctrefine command at a time writes a given folder (a second one is refused
  at once, not interleaved).
* :func:`claim_output_dir` / :func:`claim_output_file` -- the rules for outputs that already exist:
  an empty or missing folder is used; a folder holding an earlier result of the *same kind* is
  replaced only when the user says ``--overwrite``; any other non-empty folder is refused, with or
  without ``--overwrite`` (a command never deletes what it did not create). An existing file is
  replaced only with ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

FIGURES = 16  # comparison PNGs an inference result holds by default: its first this many patients


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a temporary file/folder the mode a normal create would have had under the umask."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


LOCK_NAME = ".ctrefine.lock"
MANIFEST = "ctrefine_manifest.json"


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative, sorted (links are not followed)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks: the one checksum of the project (manifests,
    the demo's record, shipped model files)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder, kind: str) -> None:
    """Record every file and folder a command wrote into ``folder``, each file with its SHA-256 (written last,
    beside them): the proof that a later ``--overwrite`` replaces only ctrefine's own, unedited files."""
    import json

    folder = Path(folder)
    entries = _entries(folder)
    sums = {e: sha256_file(folder / e) for e in entries if (folder / e).is_file() and not (folder / e).is_symlink()}
    (folder / MANIFEST).write_text(json.dumps({"kind": kind, "entries": entries, "sha256": sums}, indent=0))


def _manifest(folder: Path) -> dict | None:
    import json

    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("entries"), list) and isinstance(m.get("sha256", {}), dict)
    return m if ok else None


def foreign_entries(folder) -> list[str]:
    """What is in ``folder`` that its manifest does not list (everything, without a manifest), and every listed
    file whose content changed since it was written (the user edited it: it is theirs now)."""
    folder = Path(folder)
    m = _manifest(folder)
    listed = set(m["entries"]) | {MANIFEST} if m else set()
    sums = m.get("sha256", {}) if m else {}
    edited = [e for e, h in sums.items() if e in listed and (folder / e).is_file() and sha256_file(folder / e) != h]
    return [e for e in _entries(folder) if e not in listed] + sorted(edited)


def is_own_result(folder, kind: str) -> bool:
    """``folder`` holds exactly what a ctrefine command of ``kind`` wrote there, unedited, nothing more."""
    m = _manifest(Path(folder))
    return bool(m) and m.get("kind") == kind and not foreign_entries(folder)


@contextlib.contextmanager
def path_lock(target, what: str):
    """Exclusive lock for writing ``target`` (which may not exist yet): ``.NAME.ctrefine.lock`` beside it,
    removed when released. Another holder makes this a one-line :class:`UserError`."""
    import fcntl

    target = Path(target)
    lock = target.with_name(f".{target.name}{LOCK_NAME}")
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UserError(f"{lock}: cannot create the lock for {target} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{target}: another ctrefine command is writing this {what} now; wait for it or "
                            f"choose another") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # the holder before us removed it as we opened it: take a fresh one
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder, what: str):
    """Hold an exclusive lock on ``folder`` (an advisory ``flock`` on ``folder/.ctrefine.lock``) for the
    block; another holder makes this a one-line :class:`UserError`. The lock file is left in place
    (removing it would let a third process lock a different file); it holds nothing."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: another ctrefine command is writing this {what} now; wait for it to finish") \
                from None
        yield folder
    finally:
        os.close(fd)


def _temp_prefix(path: Path, kind: str = "") -> str:
    """Temporaries beside ``path`` are named ``.NAME.[tmp-]PID-RANDOM``: the PID tells whose they are."""
    return f".{path.name}.{kind}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


RECORD = ".ctrefine-tmp"  # beside each temporary: {"pid", "dev", "ino"} of the process and file that made it


def _record(tmp: Path) -> None:
    """Note beside ``tmp`` that this process made it (which file exactly: device and inode)."""
    import json

    st = os.lstat(tmp)
    Path(f"{tmp}{RECORD}").write_text(json.dumps({"pid": os.getpid(), "dev": st.st_dev, "ino": st.st_ino}))


def _unrecord(tmp: Path) -> None:
    Path(f"{tmp}{RECORD}").unlink(missing_ok=True)


def _recorded(rec: Path) -> tuple[int, int, int] | None:
    """``(pid, dev, ino)`` of a record ctrefine wrote, or None for anything else."""
    import json

    try:
        r = json.loads(rec.read_text()) if rec.is_file() and not rec.is_symlink() else None
        return (int(r["pid"]), int(r["dev"]), int(r["ino"])) if isinstance(r, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_orphans(path, kind: str = "") -> None:
    """Remove temporaries of ``path`` that a ctrefine process recorded making (:func:`_record`) and that died
    before finishing (a ``kill -9``): the next write of the same output cleans up after it. Only the very
    file or folder the record names (same device and inode) is removed: a user's file that merely looks
    like a temporary is never touched."""
    path = Path(path)
    for rec in path.parent.glob(f".{glob.escape(path.name)}.{kind}*{RECORD}") if path.parent.is_dir() else ():
        who = _recorded(rec)
        if who is None or _pid_alive(who[0]):
            continue
        target = Path(str(rec)[:-len(RECORD)])
        try:
            st = os.lstat(target)
            if (st.st_dev, st.st_ino) == who[1:]:
                shutil.rmtree(target) if stat.S_ISDIR(st.st_mode) else target.unlink()
        except FileNotFoundError:
            pass
        rec.unlink(missing_ok=True)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def write_failure(exc: BaseException) -> str | None:
    """Why ``exc`` means the disk refused a write (full, quota, read-only), or None if it is something else.
    ``torch.save`` reports a full disk as a ``RuntimeError`` from its archive writer, not an ``OSError``."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text):
        return "the write failed: is the disk full?"
    return None


@contextlib.contextmanager
def naming_failed_writes(path):
    """Inside the block, a write the disk refuses becomes one line naming ``path`` (the output being made, not
    an anonymous temporary), a :class:`UserError`; other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        why = write_failure(exc)
        if why is None:
            raise
        raise UserError(f"{path}: cannot write it ({why}); nothing was left half-written") from None


@contextlib.contextmanager
def atomic_file(path):
    """Write a file under a temporary name beside ``path`` (same extension, so writers that pick the
    format from it still do); on success rename it to ``path``. On any error nothing is left behind."""
    with naming_failed_writes(path), _temp_beside(Path(path)) as tmp:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_files(paths):
    """Write several files that belong together (a volume and its companions): yields a temporary path
    for each; on success all are renamed into place one after another, on any error none is, and no
    temporary is left behind."""
    paths = [Path(p) for p in paths]
    with naming_failed_writes(paths[0]), contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(_temp_beside(p)) for p in paths]
        yield tmps
        for t in tmps:
            _publish_mode(t)
        for t, p in zip(tmps, paths):
            os.replace(t, p)


@contextlib.contextmanager
def _temp_beside(path: Path):
    """A temporary file beside ``path`` (same extension), removed unless renamed away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        _record(tmp)
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()
        _unrecord(tmp)


@contextlib.contextmanager
def atomic_dir(final, recheck: Callable[[], None] | None = None):
    """Build a folder under a temporary name beside ``final``; on success put it in place of ``final``.

    Callers decide beforehand whether an existing ``final`` may be replaced (:func:`claim_output_dir`);
    here an existing ``final`` is moved aside, the new folder renamed in, then the old one removed, so
    an interruption leaves either the old or the new result, never neither. On any error the
    temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    with naming_failed_writes(final):
        yield from _atomic_dir(final, recheck)


def _atomic_dir(final: Path, recheck):
    """:func:`atomic_dir`'s body (a generator: the caller's block runs at its ``yield``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(final, "tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final, "tmp-"), dir=final.parent))
    old = None
    try:
        _record(tmp)
        yield tmp
        _publish_mode(tmp)  # mkdtemp made it private; what was created inside already followed the umask
        if recheck is not None:  # what was claimed at the start may have changed while the work ran
            recheck()
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        _unrecord(tmp)
        if old is not None:
            if final.exists():
                shutil.rmtree(old)
            else:  # the rename in failed: put the old result back
                os.rename(old, final)


def check_writable(path, what: str = "output") -> None:
    """``path`` (a file or folder to be created or replaced) can be written: its nearest existing
    ancestor is a writable folder. One-line :class:`UserError` otherwise, before any work."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: permission denied (folder not writable)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: permission denied (cannot write in {parent})")


def resolve_path(path, what: str = "path") -> Path:
    """``path`` with every link resolved; a link loop (or a link that cannot be followed) is a one-line
    :class:`UserError` naming it, not a traceback."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: Python < 3.13 reports a loop so
        raise UserError(f"{what} {path}: cannot follow its symbolic links ({exc.__class__.__name__}: a loop?)") from None


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def claim_output_dir(path, kind: str, is_same_kind: Callable[[Path], bool], overwrite: bool = False,
                     protect: tuple = ()) -> None:
    """Decide whether folder ``path`` may receive a new result of ``kind``; raise :class:`UserError` if not.

    ``protect``: folders (a dataset, say) that the output may neither be, lie inside, nor contain.
    """
    path = Path(path)
    real = resolve_path(path, "output folder")
    for p in protect:
        p = resolve_path(p, "input folder")
        if _inside(real, p) or _inside(p, real):
            raise UserError(f"output folder {path} overlaps {p}: choose a folder outside it")
    if real == Path.cwd().resolve() or _inside(Path.cwd().resolve(), real):
        raise UserError(f"output folder {path} is (or contains) the current directory: choose a new folder")
    if path.is_symlink():
        raise UserError(f"output folder {path} is a symbolic link: give the folder it points to (ctrefine replaces "
                        f"a result folder as a whole, which would replace the link)")
    check_writable(path, "output folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"output folder {path} is a file")
    if not any(path.iterdir()):
        return
    if not is_same_kind(path):
        extra = foreign_entries(path)
        what = f" (it holds {extra[0]!r}, which ctrefine did not write or which was edited since)" if extra else ""
        raise UserError(f"output folder {path} is not empty and does not hold only an earlier {kind}{what}: "
                        f"ctrefine never replaces it; choose a new or empty folder")
    if not overwrite:
        raise UserError(f"output folder {path} holds an earlier {kind}; pass --overwrite to replace it")


def claim_output_file(path, overwrite: bool = False, what: str = "output file") -> None:
    """An existing file is replaced only with ``--overwrite``; a folder never; the location must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder")
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} exists; pass --overwrite to replace it")
    check_writable(path, what)
