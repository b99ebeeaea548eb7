"""The llama.cpp peer: ``llama-server`` built once from the llama-cpp-python sdist's vendored source.

``python -m benchmarks.llama_cpp`` builds it ahead of time (8-10 min on 2 cores); ``make bench`` builds
it on first use. The binary is cached under ``~/.cache/model-serving/llama.cpp/<version>/``.
The CPU flags are explicit: a ``GGML_NATIVE=ON`` build dies with SIGILL on machines whose CPU
reports features the build host's compiler mis-detects, and AMX is off for the same reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The llama-cpp-python release whose vendored llama.cpp is built (pinned: figures must be comparable).
VERSION = "0.3.36"
CACHE_DIR = Path(os.environ.get("LLAMA_CPP_CACHE", "~/.cache/model-serving/llama.cpp")).expanduser()
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_AVX512=ON",
    "-DGGML_AVX512_VNNI=ON",
    "-DGGML_AVX512_BF16=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
]


def binary_path() -> Path:
    return CACHE_DIR / VERSION / "llama-server"


def ensure_llama_server() -> Path | None:
    """The cached ``llama-server``, built first if missing; None when the build cannot run here
    (no cmake or C++ compiler, or the sdist cannot be downloaded): the reason is printed."""
    target = binary_path()
    if target.is_file():
        return target
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        print(f"llama-server: cannot build, missing {', '.join(missing)}", flush=True)
        return None
    print(f"building llama-server from llama-cpp-python {VERSION} (once; ~10 min)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            source = _vendored_source(work)
            build = work / "build"
            subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True)
            jobs = str(os.cpu_count() or 1)
            subprocess.run(
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True
            )
        except (subprocess.CalledProcessError, OSError, tarfile.TarError) as exc:
            print(f"llama-server: build failed: {exc}", flush=True)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.rename(target)  # only a finished binary ever has the cached name
    return target


def _vendored_source(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={VERSION}", "-d", str(work)],
        check=True,
    )  # fmt: skip
    (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def server_argv(binary: Path, gguf: Path, port: int, threads: int) -> list[str]:
    """``llama-server`` as the issue measured it: 8 slots of continuous batching, 8192 context tokens."""
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-np", "8", "-c", "8192",
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(0 if ensure_llama_server() else 1)
