"""The persistent plan cache: one JSON file shared by every process of a user.

Location: ``$RUNLORA_CACHE_DIR/plans.json``, else ``$XDG_CACHE_HOME/runlora/plans.json``, else
``~/.cache/runlora/plans.json``. Layout::

    {"format": "runlora-plan-cache", "version": 1,
     "plans":   {PlanRequest.cache_key(): Plan.to_dict(), ...},
     "devices": {device_key: {"peak_flops": ..., "bandwidth": ..., ...}, ...}}

Writes merge under an exclusive ``flock`` on a side lock file, then replace the file atomically
(temp file + ``os.replace``), so DDP ranks starting together lose no entries and a reader never
sees half a file. A file that cannot be read (truncated, garbage, another version) is rebuilt
with one warning; a directory that cannot be written degrades to an in-memory cache with one
warning. Nothing here raises on a bad cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import threading
import warnings
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: atomic replace still holds, concurrent merges may drop entries
    fcntl = None

__all__ = ["PlanCache", "default_cache", "cache_dir", "device_key"]

FORMAT = "runlora-plan-cache"
VERSION = 1


def cache_dir() -> Path:
    env = os.environ.get("RUNLORA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "runlora"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def device_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """What measurements are valid for: device model, dtype and torch version."""
    device = torch.device(device)
    dt = str(dtype).replace("torch.", "")
    return f"{device.type}:{device_name(device)}|{dt}|torch{torch.__version__}"


class PlanCache:
    """A dict-like view of one cache file with ``get``/``put`` per section ("plans", "devices").

    Reads are served from memory after the first load; ``put`` writes through to disk.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "plans.json"
        self._data: dict[str, dict] | None = None
        self._memory_only = False
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _read_file(self) -> dict[str, dict]:
        empty = {"plans": {}, "devices": {}}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return empty
        except OSError as err:
            self._warn_once(
                "read", f"runlora: cannot read plan cache {self.path} ({err}); planning without it"
            )
            return empty
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("not a runlora plan cache")
            if raw.get("version") != VERSION:
                raise ValueError(f"cache version {raw.get('version')!r}, expected {VERSION}")
            data = {s: raw.get(s, {}) for s in ("plans", "devices")}
            if not all(isinstance(v, dict) for v in data.values()):
                raise ValueError("sections must be objects")
            return data
        except ValueError as err:  # JSONDecodeError is a ValueError
            self._warn_once(
                "corrupt",
                f"runlora: plan cache {self.path} is unreadable ({err}); rebuilding it",
            )
            return empty

    def _loaded(self) -> dict[str, dict]:
        if self._data is None:
            self._data = self._read_file()
        return self._data

    def get(self, section: str, key: str) -> dict | None:
        with self._lock:
            return self._loaded()[section].get(key)

    def entries(self, section: str) -> dict[str, dict]:
        with self._lock:
            return dict(self._loaded()[section])

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self):
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, data: dict[str, dict]) -> None:
        payload = {"format": FORMAT, "version": VERSION, **data}
        fd, tmp = tempfile.mkstemp(prefix=".plans.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put(self, section: str, key: str, value: dict) -> None:
        """Store one entry in memory and merge it into the file (other processes' entries kept)."""
        self.put_many(section, {key: value})

    def put_many(self, section: str, items: dict[str, dict]) -> None:
        with self._lock:
            data = self._loaded()
            data[section].update(items)
            if self._memory_only:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._file_lock():
                    on_disk = self._read_file()
                    for name in on_disk:
                        on_disk[name].update(data[name])
                    self._write(on_disk)
                    self._data = on_disk
            except OSError as err:
                self._memory_only = True
                self._warn_once(
                    "write",
                    f"runlora: cannot write plan cache {self.path} ({err}); keeping plans in "
                    "memory for this process (set RUNLORA_CACHE_DIR to a writable directory)",
                )

    def clear(self) -> None:
        """Empty the cache (memory and file)."""
        with self._lock:
            self._data = {"plans": {}, "devices": {}}
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def reload(self) -> None:
        with self._lock:
            self._data = None


_DEFAULT: dict[Path, PlanCache] = {}


def default_cache() -> PlanCache:
    """The process-wide cache for the current ``RUNLORA_CACHE_DIR`` / user cache directory."""
    path = cache_dir() / "plans.json"
    if path not in _DEFAULT:
        _DEFAULT[path] = PlanCache(path)
    return _DEFAULT[path]
