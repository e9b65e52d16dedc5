"""Build and load the native extensions in csrc/: `cpu` (C++) and `cuda` (CUDA kernels + bindings).

Each extension registers its ops with TORCH_LIBRARY under the namespace fastforget_<name>, so
loading one is all it takes: its ops then live in torch.ops.fastforget_<name>. Extensions build on
first use with torch.utils.cpp_extension and ninja, cached in FASTFORGET_CACHE (default
~/.cache/fastforget), or ahead of time by `FASTFORGET_BUILD_EXT=1 pip install .`. A missing compiler
makes that extension unavailable, with the reason; it never breaks `import fastforget`.

This module imports only torch, so setup.py can load it without importing the package.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import logging
import os
import shutil
import sys
import threading
import warnings

import torch

EXTENSIONS = ("cpu", "cuda")
NATIVE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")  # what csrc/ holds, and setup.py installs
_CSRC_CANDIDATES = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"),  # installed: fastforget/csrc
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"),  # checkout
)
_lock = threading.Lock()


class NativeUnavailable(RuntimeError):
    """An extension cannot be built or loaded here; the message says why."""


def csrc_dir() -> str:
    for path in _CSRC_CANDIDATES:
        if os.path.isdir(os.path.join(path, "cpu")):
            return path
    raise NativeUnavailable(f"native sources not found (looked in {', '.join(_CSRC_CANDIDATES)})")


def sources(name: str) -> list[str]:
    root = os.path.join(csrc_dir(), name)
    return sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "*.cu")))


def cuda_home() -> str | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, else the folder nvcc really lives in.

    nvcc on the PATH may be a wrapper script that execs the real one, so torch's guess from the
    PATH can be wrong; we read `exec <path>/bin/nvcc` lines out of such a wrapper.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        for line in head.decode(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["exec"] and len(words) > 1 and words[1].endswith("/bin/nvcc"):
                return os.path.dirname(os.path.dirname(words[1]))
    return os.path.dirname(os.path.dirname(nvcc))


def _cuda_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA libraries (nvidia/*/include), which a bare toolkit may lack."""
    try:
        nvidia = importlib.import_module("nvidia")
    except ImportError:
        return []
    dirs = [d for root in getattr(nvidia, "__path__", []) for d in sorted(glob.glob(os.path.join(root, "*", "include")))]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


# Vector ISA flags per ATen's CPU capability (what torch itself dispatches to on this machine).
_CPU_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def cuda_arch_list() -> str:
    """The GPU architectures the CUDA extension is built for: TORCH_CUDA_ARCH_LIST, else those of
    the GPUs here (as torch would pick), else Hopper's (no GPU to ask)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        found = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(sorted(found))
    return "9.0"


def cpu_capability() -> str:
    """ATen's CPU capability here (DEFAULT, AVX2, AVX512, ...): the CPU extension is built for it."""
    return torch.backends.cpu.get_cpu_capability()


def _flags(name: str) -> dict:
    cflags = ["-O3"]  # torch picks the C++ standard its headers need
    if name == "cpu":
        # at::parallel_for is an OpenMP pragma in the header: without -fopenmp it runs serially.
        # No errno from sqrt: otherwise every square root is a call and no loop over one vectorises.
        isa = _CPU_ISA_FLAGS.get(cpu_capability(), [])
        return {"extra_cflags": cflags + isa + ["-fopenmp", "-fno-math-errno"], "extra_ldflags": ["-fopenmp"]}
    # The pip CUDA libraries' headers are searched after the toolkit's (which torch passes as
    # -isystem before these flags): a complete toolkit is used as it is, and a bare one (no cuBLAS
    # headers, as here) borrows only what it lacks, never a second copy of the runtime's headers.
    pip_headers = _cuda_include_dirs()
    return {
        "extra_cflags": cflags + [f"-idirafter{d}" for d in pip_headers],
        "extra_cuda_cflags": ["-O3", "-lineinfo"] + [flag for d in pip_headers for flag in ("-isystem", d)],
    }


def _cpp_extension():
    """torch.utils.cpp_extension, with CUDA_HOME set from cuda_home() before it guesses, and without
    its import-time "No CUDA runtime is found" warning: on a CPU machine that is how things are."""
    home = cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", home)
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _check_toolchain(name: str) -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NativeUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on the PATH")
    if name == "cuda":
        if torch.version.cuda is None:
            raise NativeUnavailable(f"this torch ({torch.__version__}) is built without CUDA")
        home = cuda_home()
        if home is None:
            raise NativeUnavailable("no CUDA toolkit: nvcc not on the PATH and CUDA_HOME not set")
        os.environ.setdefault("CUDA_HOME", home)
        _cpp_extension().CUDA_HOME = os.environ["CUDA_HOME"]  # in case torch guessed otherwise at import
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()


_failures: dict[str, str] = {}  # extension -> why it did not build: asked again, it says so at once


def load(name: str) -> str:
    """Build (if needed) and load extension `name`; returns the torch.ops namespace it registered.

    Raises NativeUnavailable with the reason when it cannot be built or loaded; a failure is
    remembered for the process, so ops that ask again do not rebuild on every call.
    """
    if name not in EXTENSIONS:
        raise ValueError(f"unknown native extension {name!r}; expected one of {EXTENSIONS}")
    if name in _failures:
        raise NativeUnavailable(_failures[name])
    try:
        return _build_and_load(name)
    except NativeUnavailable as err:
        _failures[name] = str(err)
        raise


def _native_files(name: str) -> list[str]:
    """Every source and header extension `name` is built from (its folder and common/)."""
    return sorted(path for folder in ("common", name) for ext in NATIVE_SUFFIXES
                  for path in glob.glob(os.path.join(csrc_dir(), folder, f"*{ext}")))


@functools.lru_cache(maxsize=None)
def build_key(name: str) -> str:
    """What an extension's binary depends on: its sources and headers, torch's version, the compile
    flags (not the machine's include paths) and, for the CPU, the vector ISA, for CUDA the
    architectures. A prebuilt file carries it in its name."""
    root = csrc_dir()
    files = _native_files(name)
    flags = [f for values in _flags(name).values() for f in values
             if not os.path.isabs(f) and not f.startswith(("-idirafter", "-isystem"))]
    target = cpu_capability() if name == "cpu" else cuda_arch_list()
    digest = hashlib.sha256(f"{torch.__version__} {target} {flags}".encode())
    for path in files:
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def prebuilt(name: str) -> str | None:
    """The binary setup.py built ahead of time for these sources, torch and CPU, if any. One built
    for anything else is passed over (with a warning): it would run old code, or crash on an ISA
    this CPU lacks."""
    found = glob.glob(os.path.join(PACKAGE_DIR, f"_{name}_{build_key(name)}.*.so"))
    if found:
        return found[0]
    if glob.glob(os.path.join(PACKAGE_DIR, f"_{name}_*.so")):
        warnings.warn(f"fastforget: the prebuilt {name} extension in {PACKAGE_DIR} was built for other sources, "
                      f"another torch or another CPU; building it on first use instead", stacklevel=3)
    return None


@functools.lru_cache(maxsize=None)
def _build_and_load(name: str) -> str:
    namespace = f"fastforget_{name}"
    if binary := prebuilt(name):  # built ahead of time by setup.py
        torch.ops.load_library(binary)
        return namespace
    with _lock:
        cpp_extension = _cpp_extension()
        _check_toolchain(name)

        build_dir = os.path.join(
            os.environ.get("FASTFORGET_CACHE", os.path.expanduser("~/.cache/fastforget")),
            f"torch{torch.__version__}-{name}" + (f"-{cpu_capability().lower()}" if name == "cpu" else ""),
        )
        os.makedirs(build_dir, exist_ok=True)
        if _stale(name, os.path.join(build_dir, f"{namespace}.so")) and os.environ.get("RANK", "0") == "0":
            # said before the wait (once per run, not per rank), not hidden inside a first step
            print(f"fastforget: building the {name} extension (first use only, about 30 s on 2 cores); "
                  f"cached in {build_dir}", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=namespace,
                sources=sources(name),
                build_directory=build_dir,
                is_python_module=False,
                verbose=os.environ.get("FASTFORGET_VERBOSE_BUILD") == "1",
                **_flags(name),
            )
        except Exception as err:  # compiler errors arrive as RuntimeError or subprocess errors
            raise NativeUnavailable(f"building the {name} extension failed: {_last_lines(err)}") from err
    return namespace


def _stale(name: str, binary: str) -> bool:
    """Whether ninja will compile: no binary yet, or a source or header newer than it."""
    if not os.path.exists(binary):
        return True
    built = os.path.getmtime(binary)
    return any(os.path.getmtime(path) > built for path in _native_files(name))


def unavailable_reason(name: str) -> str | None:
    """None when extension `name` loads, else why it does not."""
    try:
        load(name)
    except NativeUnavailable as err:
        return str(err)
    return None


def ops(name: str):
    """torch.ops namespace of a loaded extension (raises NativeUnavailable)."""
    return getattr(torch.ops, load(name))


def _last_lines(err: Exception, n: int = 12) -> str:
    """The compiler's error lines (or the last lines) of a failed build, for the reason."""
    text = str(err).strip().splitlines()
    errors = [line for line in text if "error" in line.lower()]
    return "\n".join((errors or text)[-n:]) if text else type(err).__name__


def setup_extensions():
    """ext_modules and cmdclass for setup.py when FASTFORGET_BUILD_EXT=1."""
    cpp_extension = _cpp_extension()

    def rel(paths):  # setuptools wants sources relative to setup.py
        return [os.path.relpath(p) for p in paths]

    cpu = _flags("cpu")
    exts = [cpp_extension.CppExtension(f"fastforget._cpu_{build_key('cpu')}", rel(sources("cpu")),
                                       extra_compile_args={"cxx": cpu["extra_cflags"]},
                                       extra_link_args=cpu["extra_ldflags"])]
    try:
        _check_toolchain("cuda")
        flags = _flags("cuda")
        exts.append(
            cpp_extension.CUDAExtension(
                f"fastforget._cuda_{build_key('cuda')}",
                rel(sources("cuda")),
                extra_compile_args={"cxx": flags["extra_cflags"], "nvcc": flags["extra_cuda_cflags"]},
            )
        )
    except NativeUnavailable as err:
        print(f"fastforget: skipping the CUDA extension: {err}")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
