"""Compile a kernel's C source once per source, compiler flags and CPU kind; cache the shared library.

The library lands in ``<cache_dir>/kernels/`` under a name hashed from the source and flags, so an
edited kernel is rebuilt and concurrent builders never see a half-written file (write, then rename).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


class KernelUnavailableError(RuntimeError):
    """The kernel cannot run here (no C compiler, a CPU without the instructions, a failed build)."""


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def load(source: Path, flags: list[str], needs: set[str], cache_dir: Path) -> ctypes.CDLL:
    """The shared library built from ``source`` with ``flags`` (cached, else built now); raises
    :class:`KernelUnavailableError` if the CPU lacks any of ``needs`` (``/proc/cpuinfo`` flags), or the
    library is not cached and cannot be built (no C compiler, a failing one, a read-only cache).

    Load PyTorch first: the library links ``libgomp.so.1`` and must share PyTorch's OpenMP runtime
    (two runtimes on the same cores spin against each other).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailableError(f"needs an x86-64 CPU, not {platform.machine()}")
    missing = sorted(needs - cpu_flags())
    if missing:
        raise KernelUnavailableError(f"the CPU lacks {', '.join(missing)}")
    # Named by source and flags only: a library built where a compiler was (an image's build stage)
    # loads where none is (its runtime).
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir.expanduser() / "kernels" / f"{source.stem}-{digest}.so"
    if not target.is_file():
        _build(source, flags, target)
    return ctypes.CDLL(str(target))


def _build(source: Path, flags: list[str], target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise KernelUnavailableError("no C compiler (cc, gcc or clang) to build it with")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as exc:  # a read-only cache (an image's) without the library in it
        raise KernelUnavailableError(f"cannot write the library into {target.parent}: {exc}") from exc
    os.close(fd)
    try:
        try:
            result = subprocess.run(
                [cc, *flags, "-shared", "-fPIC", str(source), "-o", tmp],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelUnavailableError(f"cannot run the C compiler {cc}: {exc}") from exc
        if result.returncode != 0:
            error = result.stderr.strip()[-500:]
            raise KernelUnavailableError(f"{cc} failed to build {source.name}: {error}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
