"""Files that survive interruptions and say what is wrong with them.

Every file qlip writes goes through :func:`write_atomic` / :func:`save_tensors` /
:func:`save_image_atomic`: written to a temporary file beside its target, then renamed over it,
so a crash leaves the old file or the new one, never half of one; the file gets the user's umask
like any other file. Every file qlip reads goes through :func:`read_json` /
:func:`load_tensors` / :func:`read_tensor_metadata` / :func:`check_format`: a truncated, corrupt,
foreign or newer file raises :class:`CorruptFileError` naming the file and saying how to make it
again. :class:`FolderLock` keeps two qlip processes out of one output folder.

>>> write_atomic("runs/x/settings.json", json.dumps(settings))  # doctest: +SKIP
>>> meta = read_json("runs/x/settings.json", "delete it and run again")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

LOCK_FILE = ".qlip.lock"
CRASH_ENV = "QLIP_CRASH_AT"  # fault injection for the test suite: see crash_point


class CorruptFileError(ValueError):
    """A file qlip reads is truncated, corrupt, foreign or of a newer version."""


class FolderInUseError(ValueError):
    """An output folder is held by another running qlip process."""


def note(message: str) -> None:
    """One line on stderr about what qlip decided (a cache reused, a run resumed, a lock taken
    over): never silent, never in the way of stdout."""
    print(f"qlip: {message}", file=sys.stderr, flush=True)


def crash_point(name: str) -> None:
    """Fault injection: SIGKILL this process here when ``QLIP_CRASH_AT`` names this point
    (``name``, or ``name:N`` for its N-th pass, counting from 1). The test suite uses it to
    kill a run at a chosen place and check that the resumed run gives the same bytes."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    passes = _CRASH_PASSES[name] = _CRASH_PASSES.get(name, 0) + 1
    if passes >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_PASSES: dict[str, int] = {}


def _umask() -> int:
    """The process's umask: Linux shows it in /proc (no race); elsewhere it can only be read by
    setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _publish(temporary: Path, path: Path) -> None:
    """Give ``temporary`` the mode a plain ``open()`` would have given it, then rename it over
    ``path`` (mkstemp and safetensors create files 0600)."""
    os.chmod(temporary, 0o666 & ~_umask())
    crash_point("before-rename")
    os.replace(temporary, path)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def copy_atomic(source: str | Path, path: str | Path) -> None:
    """Copy ``source`` to ``path`` whole or not at all: a reader (or a resumed job) never finds
    a half-copied file under ``path``."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        shutil.copyfile(source, temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        _publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of torch tensors or numpy arrays, written atomically."""
    path = Path(path)
    first = next(iter(tensors.values()), None)
    if first is not None and not hasattr(first, "detach"):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    temporary = _temporary(path)
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        _sort_header(temporary)
        _publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted: safetensors writes the metadata in a
    per-process hash order, so the same tensors would give other bytes in another process (a
    resumed run could not be compared byte for byte with a straight one). Same length, same
    offsets: only the order of the JSON keys changes."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= size:
            handle.seek(8)
            handle.write(text + b" " * (size - len(text)))


def save_image_atomic(image, path: str | Path) -> None:
    """A PIL image as PNG, written atomically (a torn PNG never sits under the final name)."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        image.save(temporary, format="PNG")
        _publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def image_is_whole(path: str | Path) -> bool:
    """Does ``path`` hold a complete, readable image (PNG chunks and checksums intact)?"""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds (SyntaxError, OSError, struct.error...)
        return False


def _missing(path: Path, remedy: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found; {remedy}")


def read_json(path: str | Path, remedy: str):
    """The JSON value in ``path``; a missing, unreadable or non-JSON file raises with ``remedy``
    (what to do, e.g. "delete it and run `qlip quantize` again")."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, remedy)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is corrupt (not JSON: {err}); {remedy}") from err


def read_json_dict(path: str | Path, remedy: str) -> dict:
    """:func:`read_json`, refusing anything but a JSON object."""
    value = read_json(path, remedy)
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} is corrupt (a JSON {type(value).__name__}, not an "
                               f"object); {remedy}")
    return value


def check_format(meta: dict, path: str | Path, fmt: str, version: int, remedy: str,
                 key: str = "format") -> int:
    """The version of a file whose header ``meta`` says ``{key: fmt, "version": v}``: refuses a
    foreign format, a version that is not an integer and one newer than ``version``."""
    if meta.get(key) != fmt:
        raise CorruptFileError(f"{path} is not a {fmt} file ({key} {meta.get(key)!r}); {remedy}")
    raw = meta.get("version", 1)
    try:
        got = int(raw)
        if isinstance(raw, bool) or str(got) != str(raw).strip():
            raise ValueError(raw)
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{path} has version {raw!r}, not an integer: corrupt or edited; "
                               f"{remedy}") from err
    if got > version:
        raise CorruptFileError(f"{path} was written by a newer qlip (format version {got}, this "
                               f"qlip reads <= {version}); upgrade qlip, or {remedy}")
    return got


def _open_error(path: Path, err: Exception, remedy: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is corrupt or truncated (safetensors: {err}); {remedy}")


def read_tensor_metadata(path: str | Path, remedy: str) -> dict[str, str]:
    """The metadata of a safetensors file, reading its header only (a quick check before work)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise _missing(path, remedy)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _open_error(path, err, remedy) from err


def load_tensors(path: str | Path, remedy: str, framework: str = "pt"
                 ) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file (``framework`` "pt" or "numpy"); a missing,
    truncated or corrupt file raises with ``remedy``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise _missing(path, remedy)
    try:
        with safe_open(str(path), framework=framework) as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _open_error(path, err, remedy) from err


# -- output folders in use -------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(text: str) -> dict:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except json.JSONDecodeError:
        return {}


class FolderLock:
    """``folder/.qlip.lock`` held while one qlip command writes into ``folder``. The file names
    its holder (pid, host, command, start time). A second process is refused with that holder
    named; the lock of a process that is no longer running (``kill -9``, a crash) is taken over,
    with a line saying so. Where ``fcntl`` exists the kernel's advisory lock decides who holds the
    folder (released by the kernel when the holder dies, whatever the file says); elsewhere the
    recorded pid is checked.

    >>> with FolderLock("runs/eval/w4a8", "qlip eval"):  # doctest: +SKIP
    ...     run_evaluation(...)
    """

    def __init__(self, folder: str | Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, holder: dict) -> FolderInUseError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
               f"since {holder.get('since')}") if holder else "a process that did not say which"
        return FolderInUseError(
            f"{self.folder} is in use by another qlip process ({who}); wait for it to finish, "
            f"or write to another folder (if no such process runs, delete {self.path})")

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no kernel lock: the pid in the file decides
            fcntl = None
        for _ in range(10):  # another process may delete the file between our open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(os.read(fd, 4096).decode(errors="replace"))
                    os.close(fd)
                    raise self._refuse(holder) from None
                if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
                os.close(fd)  # we locked a file that was just deleted: lock the new one
                continue
            break
        else:
            raise FolderInUseError(f"could not take the lock {self.path}: it keeps changing")
        old = _holder(os.read(fd, 4096).decode(errors="replace"))
        pid = old.get("pid")
        if isinstance(pid, int) and pid != os.getpid():  # its holder never released it
            if fcntl is None and _alive(pid) and old.get("host") == socket.gethostname():
                os.close(fd)
                raise self._refuse(old)
            note(f"taking over {self.path}, left by pid {pid} (`{old.get('command')}`), which "
                 "no longer holds it (it crashed or was killed)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # delete while still holding the lock: a waiter that opened the old file re-checks
        # the inode and locks the new one
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
