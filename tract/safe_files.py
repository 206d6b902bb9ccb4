"""Files of a run folder, written and read so that a copied, shared or hostile folder cannot be turned against its user.

Writing never follows a link: a file is created fresh (``O_CREAT | O_EXCL | O_NOFOLLOW``) under a temporary name and
renamed into place (a rename replaces a planted link, never its target), or appended to only when it is a plain file
with one name (``O_NOFOLLOW``, then ``fstat``: no symbolic or hard link to a file elsewhere). A write that fails (a full
disk) leaves no partial file behind.

Reading is bounded before anything is parsed or hashed: the file is opened without following links and must be a
regular file under a size limit; JSON and YAML are parsed within a nesting depth and (YAML) an expanded size, so an
alias bomb is refused before anything walks it; numbers must be finite.
"""
import errno
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

from tract.errors import ConfigError

__all__ = ["UnsafeFileError", "MAX_JSON_BYTES", "MAX_YAML_BYTES", "MAX_DEPTH", "MAX_YAML_NODES", "link_problem",
           "refuse_link", "special_kind", "refuse_special", "remove_entry", "private_folder", "current_umask",
           "write_private", "write_new", "write_atomic", "append_text", "read_bytes", "read_exact", "parse_json",
           "read_json", "read_json_lines", "parse_yaml", "read_yaml", "sha256_file", "disk_full", "disk_problem",
           "WriteFailed", "write_failed"]

MAX_JSON_BYTES = 1 << 20  # a manifest or train state is a few KB
MAX_YAML_BYTES = 1 << 20  # args.yaml and configs are a few KB
MAX_DEPTH = 32  # what train.py writes nests 3 deep
MAX_YAML_NODES = 100_000  # values after expanding YAML aliases: an args.yaml has a few hundred
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # O_NONBLOCK: a planted FIFO must not hang the open
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


class UnsafeFileError(ConfigError):
    """A file or folder that is refused: a link to elsewhere, not a regular file, too large, or beyond the bounds."""


class WriteFailed(ConfigError):
    """A file of the run that could not be written (a full or read-only disk): the message names it and the fix."""


def disk_full(error: BaseException) -> bool:
    """Whether an error means the disk is full (torch reports it as RuntimeError '... unexpected pos ...')."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(sign in text for sign in ("unexpected pos", "No space left", "StorageFull", "code: 28"))


def disk_problem(path: Path, error: BaseException) -> str:
    """Why writing at ``path`` failed, in words ("disk full" for torch's and safetensors' ways of saying it), with the
    free space of its disk."""
    error = getattr(error, "error", error)  # a WriteFailed: the error it tells of
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**30:.2f} GiB free on that disk"
    except OSError:
        free = "free space unknown"
    if disk_full(error):
        reason = "No space left on device (disk full)"
    elif isinstance(error, OSError) and error.errno:
        reason = os.strerror(error.errno)
    else:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return f"{reason} ({free})"


def write_failed(path: Path, error: BaseException, run: Path) -> WriteFailed:
    """The one message for a write into run folder ``run`` that failed: what, why, free space, the command to rerun."""
    failed = WriteFailed(f"cannot write {path}: {disk_problem(path, error)}. Free space (or fix the permissions), "
                         f"then rerun the command with --resume {run}")
    failed.error = error
    return failed


def link_problem(path: Path) -> Optional[str]:
    """What is wrong with ``path`` being a symbolic link (None when it is not one)."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return f"{path} is a link to {target}"


def refuse_link(path: Path, fix: str) -> None:
    """Raise UnsafeFileError naming ``path`` if it is a symbolic link; ``fix`` says what to do."""
    problem = link_problem(path)
    if problem:
        raise UnsafeFileError(f"{problem}, not a file or folder of the run itself: nothing is written through it. "
                              f"{fix}")


_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"))


def special_kind(mode: int) -> Optional[str]:
    """What a file of ``mode`` (``st_mode``) is when it is a FIFO, socket or device, whose reading may wait forever
    or never end; None for a regular file or folder."""
    return next((kind for test, kind in _KINDS if test(mode)), None)


def refuse_special(path: Path, what: str) -> None:
    """Refuse a user-given path that is a FIFO, socket or device, found by ``stat`` (links followed: a user's own path
    may be one), never by opening it, which waits for a FIFO's writer; a path that does not exist passes (its reader
    says so)."""
    try:
        kind = special_kind(os.stat(path).st_mode)
    except OSError:
        return
    if kind:
        raise UnsafeFileError(f"{what} {path} is a {kind}, not a file or folder: nothing is read from it. Pass a "
                              "regular file or folder")


def remove_entry(path: Path) -> None:
    """Remove whatever is at ``path`` without following it: a link (never its target), a file, or a real folder."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)  # rmtree removes links inside a folder, never what they point to
    else:
        os.unlink(path)


def private_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` that no one else can enter (``mkdtemp``: a name no one can predict, mode 0700), for
    a library that writes files by name (Accelerate's save_state, safetensors, timm): no one can plant a link in it
    for the library to write through."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def current_umask() -> int:
    """The process's umask (the permissions a new file or folder does not get)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_private(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` with ``write(name)``, a library's writer that opens its file by name: it writes into a private
    folder beside ``path`` (private_folder), and the file, given the permissions the umask gives, is renamed over
    ``path``. A failure leaves nothing (nor does a leftover of a kill outlive the next write)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.*"):
        remove_entry(leftover)
    folder = private_folder(path.parent, f".{path.name}.")
    try:
        write(folder / path.name)
        os.chmod(folder / path.name, 0o666 & ~current_umask())  # safetensors creates files owner-only; these are shared
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` with ``data``; refuse (FileExistsError) anything already there, a link included."""
    fd = os.open(path, _OPEN_NEW, mode)
    try:
        _write_fd(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: written to a fresh ``.NAME.tmp`` beside it, then renamed over it; on a failure
    (a full disk) nothing is left and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove_entry(tmp)  # a leftover of a kill, or a planted link: removed, never written through
    write_new(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing), only when it is a regular file with one name; on a failure
    the file is cut back to what it held, so no torn line is left."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path, f"Delete {path}, then rerun the command with --resume {Path(path).parent}")
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise UnsafeFileError(f"{path} is not a plain file of the run (it has {info.st_nlink} names: a hard link "
                                  f"to a file elsewhere): nothing is written through it. Delete {path}, then rerun "
                                  f"the command with --resume {Path(path).parent}")
        try:
            _write_fd(fd, text.encode())
        except OSError:
            os.ftruncate(fd, info.st_size)
            raise
    finally:
        os.close(fd)


def _open_regular(path: Path, limit: int, follow: bool = False):
    """(fd, size) of a regular file at ``path`` (not followed if a link, unless ``follow``) of at most ``limit``
    bytes."""
    try:
        fd = os.open(path, _OPEN_READ & ~os.O_NOFOLLOW if follow else _OPEN_READ)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(f"{link_problem(path) or path}, not a file of the run") from None
        raise UnsafeFileError(f"{path}: cannot be read ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file")
    if info.st_size > limit:
        os.close(fd)
        raise UnsafeFileError(f"{path} holds {info.st_size} bytes, more than the {limit} such a file can have")
    return fd, info.st_size


def read_bytes(path: Path, limit: int, follow: bool = False) -> bytes:
    """The content of a regular file of at most ``limit`` bytes (UnsafeFileError otherwise); a link is refused unless
    ``follow`` (a user's own config file may be one; a run folder's files may not)."""
    fd, size = _open_regular(path, limit, follow)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(size + 1)
            while len(data) > size and len(data) <= limit:  # growing while read: read on, never past the limit
                more = f.read(min(1 << 22, limit + 1 - len(data)))
                if not more:
                    break
                data += more
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise UnsafeFileError(f"{path} holds more than the {limit} bytes such a file can have")
    return data


def read_exact(path: Path, size: int) -> bytes:
    """The content of a regular file (not followed if a link) that must hold exactly ``size`` bytes, read by one open
    into memory: what the caller hashes is what it parses, whatever happens to the name meanwhile."""
    fd, actual = _open_regular(path, size)
    try:
        if actual != size:
            raise UnsafeFileError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(size + 1)
    finally:
        os.close(fd)
    if len(data) != size:  # grew or shrank while being read
        raise UnsafeFileError(f"{path}: {len(data)} bytes read, the manifest says {size} (changed while read)")
    return data


def sha256_file(path: Path, size: int) -> str:
    """SHA-256 of a regular file (not followed if a link) that must hold exactly ``size`` bytes; no more is read."""
    import hashlib

    fd, actual = _open_regular(path, size)
    h, left = hashlib.sha256(), size
    try:
        if actual != size:
            raise UnsafeFileError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            while left and (chunk := f.read(min(left, 1 << 22))):
                h.update(chunk)
                left -= len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _check_depth(value: Any, path: Path, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeFileError(f"{path} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, path, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, path, depth + 1)


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number train.py writes")


def parse_json(data: bytes, name: Any) -> Any:
    """Parse JSON bytes within the bounds (depth, finite numbers: no NaN or Infinity, which Python's json accepts);
    UnsafeFileError naming ``name`` (a file, or a file and line) otherwise. The caller bounds the size."""
    import json

    try:
        value = json.loads(data.decode(), parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise UnsafeFileError(f"{name} nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeFileError(f"{name} is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    _check_depth(value, name)
    return value


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file within the bounds (size, depth, finite numbers); UnsafeFileError naming it otherwise."""
    return parse_json(read_bytes(path, limit), path)


def read_json_lines(path: Path, limit: int, check: Callable[[Any], None]) -> List[Any]:
    """The values of a file of one JSON value per line (bounded as read_json), each passed to ``check``, which raises
    ValueError for one a writer of the file cannot have written; a bad line is one UnsafeFileError naming the file and
    its line number. A last line without its newline (cut short by a kill) is left out."""
    lines = read_bytes(path, limit).split(b"\n")
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = parse_json(line, f"{path} line {number}")
        except UnsafeFileError:
            if number == len(lines):  # no newline after it: a write that a kill cut short
                break
            raise
        try:
            check(value)
        except ValueError as e:
            raise UnsafeFileError(f"{path} line {number}: {e}") from None
        values.append(value)
    return values


def _expanded_nodes(value: Any, path: Path, sizes: dict, depth: int = 0) -> int:
    """How many values ``value`` holds once YAML's aliases are expanded (each shared value counted once per use)."""
    if not isinstance(value, (dict, list)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UnsafeFileError(f"{path} holds a number that is not finite ({value})")
        return 1
    if depth > MAX_DEPTH:
        raise UnsafeFileError(f"{path} nests deeper than {MAX_DEPTH} levels")
    key = id(value)
    if key in sizes:
        if sizes[key] is None:
            raise UnsafeFileError(f"{path} holds a value that contains itself (a recursive YAML alias)")
        return sizes[key]
    sizes[key] = None
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1 + sum(_expanded_nodes(item, path, sizes, depth + 1) for item in items)
    if total > MAX_YAML_NODES:
        raise UnsafeFileError(f"{path} expands to more than {MAX_YAML_NODES} values (a YAML alias bomb?)")
    sizes[key] = total
    return total


def read_yaml(path: Path, limit: int = MAX_YAML_BYTES, *, follow: bool = False, fix: str = "") -> Any:
    """Parse a YAML file with yaml.safe_load within the bounds (size, depth, expanded size, finite numbers); anything
    outside them is one UnsafeFileError naming the file, ending with ``fix``.

    Aliases are kept as shared values while parsing, so a bomb costs nothing until something walks it; the walk
    here counts each shared value once per use, memoised, and refuses beyond MAX_YAML_NODES.
    """
    try:
        return _read_yaml(path, limit, follow)
    except UnsafeFileError as e:
        if not fix:
            raise
        raise UnsafeFileError(f"{e}: {fix}") from None


def _read_yaml(path: Path, limit: int, follow: bool) -> Any:
    return parse_yaml(read_bytes(path, limit, follow), path)


def parse_yaml(data: bytes, path: Any) -> Any:
    """Parse YAML bytes with yaml.safe_load within the bounds (depth, expanded size, finite numbers); UnsafeFileError
    naming ``path`` otherwise. The caller bounds the size."""
    import yaml

    try:
        value = yaml.safe_load(data.decode())
    except RecursionError:
        raise UnsafeFileError(f"{path} nests deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise UnsafeFileError(f"{path} is not text") from None
    except yaml.YAMLError as e:  # syntax errors, and tags (!!python/...) that safe_load refuses
        detail = " ".join(str(e).split())[:300]
        raise UnsafeFileError(f"{path} is not plain YAML ({detail})") from None
    _expanded_nodes(value, path, {})
    return value
