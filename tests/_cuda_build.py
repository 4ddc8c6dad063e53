"""Building and reading fusedformer._C in the tests without a GPU: setup.py's own nvcc lookup, a
build of csrc/ into build/ (git-ignored; ninja keeps rebuilds incremental), the in-place build
when it is current, and cuobjdump's resource report of the kernels in a built library."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fusedformer import backends

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def setup_module():
    """setup.py as a module (its setup() call runs only as __main__), for the build's own helpers."""
    spec = importlib.util.spec_from_file_location("fusedformer_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# where setup.py looks for nvcc: CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda
NVCC = setup_module().find_nvcc()


def build_extension(archs, build_dir):
    """fusedformer._C built from this checkout's csrc/ for ``archs`` (FUSEDFORMER_CUDA_ARCHS) into
    ``build_dir``, loaded from there. Fails on any nvcc/ptxas warning."""
    env = dict(os.environ, FUSEDFORMER_BUILD_CUDA="1", FUSEDFORMER_CUDA_ARCHS=archs,
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"), PYTHONPATH=str(ROOT / "python"))
    lib = build_dir / "lib"
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(build_dir / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "warning" in line.lower() and ("csrc" in line or "nvcc" in line or "ptxas" in line)]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings)
    built = list((lib / "fusedformer").glob("_C*.so"))
    assert len(built) == 1, f"expected one _C library in {lib / 'fusedformer'}, found {built}"
    return load_extension(built[0])


def load_extension(path):
    """The _C library at ``path``, under a name of its own: loaded as "fusedformer._C" it would be
    the in-place _C whenever that one was imported first (Python keeps extension modules by name)."""
    package = "_fusedformer_build_" + "".join(c if c.isalnum() else "_" for c in str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(f"{package}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def current_in_place_extension(targets):
    """The in-place fusedformer._C when it is built for every one of ``targets`` and newer than
    every file of csrc/ and setup.py (so it is what those sources compile to), else None."""
    ext = backends.cuda_extension()
    if ext is None or not set(targets) <= set(getattr(ext, "BUILT_ARCHS", ())):
        return None
    built = Path(ext.__file__).stat().st_mtime
    sources = [*CSRC.iterdir(), ROOT / "setup.py"]
    return ext if all(p.stat().st_mtime <= built for p in sources) else None


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit next to nvcc, PATH, or the triton wheel's bundled copy."""
    candidates = [Path(NVCC).parent / "cuobjdump"] if NVCC else []
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(p) for p in candidates if p.exists()), None)


_ARCH = re.compile(r"^arch = (sm_\w+)")
_FUNCTION = re.compile(r"^\s*Function (\S+):")
_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def resource_usage(cuobjdump, library):
    """{arch: {mangled kernel name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}} from
    ``cuobjdump -res-usage``: registers per thread, static shared memory per block in bytes, ..."""
    out = subprocess.run([cuobjdump, "-res-usage", str(library)], capture_output=True, text=True, check=True).stdout
    usage, arch, function = {}, None, None
    for line in out.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage.setdefault(arch, {})[function] = {k: int(v) for k, v in _FIELD.findall(line)}
            function = None
    return usage
