"""fusedformer's build.

The Python package always installs. ``FUSEDFORMER_BUILD_CUDA`` decides whether csrc/ is compiled
into ``fusedformer._C`` (nvcc + pybind11 through a generated ninja file):

  auto (default)  build when nvcc is found, and say which way it went. A failed build installs
                  without _C, prints a banner and records why in fusedformer/_build.json, which
                  ``fusedformer info`` and the cuda backend's unavailability reason report (pip -q
                  hides the banner, not the record).
  1               build or fail the install.
  0               no CUDA build: a pure-Python wheel.

``_C`` links the CUDA runtime statically and nothing of libtorch: launchers take raw pointers,
sizes, strides and a stream handle, so one build serves every torch version.

Environment:
  FUSEDFORMER_BUILD_CUDA   auto | 0 | 1, as above
  FUSEDFORMER_CUDA_ARCHS   semicolon/comma separated, e.g. "80;90a" (default "80;90a"); PTX of
                           the newest is added for later GPUs (cuda_targets())
  MAX_JOBS                 parallel compile jobs (default: CPU count)
  CUDA_HOME / CUDA_PATH    where to look for bin/nvcc before PATH
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
BUILD_MODES = ("auto", "0", "1")
# what a build leaves beside fusedformer/_C: how it went (fusedformer._build_info reads it)
BUILD_RECORD = "_build.json"


def _log(msg):
    print(f"fusedformer: {msg}", file=sys.stderr, flush=True)


def version():
    """The version written in python/fusedformer/_version.py (the only place it is written)."""
    text = (ROOT / "python" / "fusedformer" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def license_metadata():
    """The SPDX license expression where setuptools takes one (>= 77: ``license = "..."``
    metadata, without the deprecation warning of the table form), else the old free-text field:
    the build also runs with --no-build-isolation under older setuptools (a venv's seeded one)."""
    major = int(setuptools.__version__.split(".")[0])
    if major >= 77:
        return {"license_expression": "Apache-2.0", "license_files": ["LICENSE"]}
    return {"license": "Apache-2.0"}


def build_mode():
    mode = os.environ.get("FUSEDFORMER_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise SystemExit(f"fusedformer: FUSEDFORMER_BUILD_CUDA={mode!r}: expected one of {', '.join(BUILD_MODES)}")
    return mode


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuda_targets():
    """What _C is built for, e.g. ["sm_80", "sm_90a", "compute_90"]: machine code for every arch
    of FUSEDFORMER_CUDA_ARCHS, and PTX of the newest one (without an arch-specific a/f suffix,
    whose PTX no other GPU can use), which the driver compiles for GPUs newer than all of them."""
    raw = os.environ.get("FUSEDFORMER_CUDA_ARCHS", "80;90a")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    newest = max((a.rstrip("af") for a in archs), key=int)
    return [f"sm_{a}" for a in archs] + [f"compute_{newest}"]


def gencode_flags(targets):
    """nvcc flags building `targets` (cuda_targets() entries)."""
    return [f"-gencode=arch=compute_{t.split('_')[1]},code={t}" for t in targets]


class CudaExtension(Extension):
    """An extension built by nvcc through ninja rather than by setuptools' compiler."""


def _banner(msg):
    line = "!" * 78
    _log(f"\n{line}\n{msg}\n{line}")


class BuildExt(build_ext):
    """Builds the CUDA extension with nvcc, times it, and records the outcome beside it."""

    def run(self):
        self.record = None
        super().run()
        if self.record is not None:
            self._write_record()

    def build_extensions(self):
        failed = []
        for ext in self.extensions:
            if not isinstance(ext, CudaExtension):
                self.build_extension(ext)
                continue
            t0 = time.monotonic()
            try:
                targets = self._build_cuda(ext)
            except Exception as exc:  # in auto mode a broken toolchain must not break `pip install`
                if build_mode() == "1":
                    raise
                self.record = {"cuda_build": "failed", "error": f"{exc.__class__.__name__}: {exc}"[:2000]}
                _banner(f"the CUDA build FAILED ({exc}); fusedformer is installed WITHOUT fusedformer._C, so "
                        "the cuda backend is unavailable (`fusedformer info` says why). Set "
                        "FUSEDFORMER_BUILD_CUDA=1 to make this an error, or 0 to skip the build.")
                failed.append(ext)
                continue
            seconds = time.monotonic() - t0
            self.record = {"cuda_build": "built", "targets": targets, "seconds": round(seconds, 1)}
            _log(f"built fusedformer._C in {seconds:.0f} s")
        # what failed is not installed: setuptools must not look for its output
        self.extensions = [ext for ext in self.extensions if ext not in failed]

    def _write_record(self):
        """The outcome beside _C in the build tree (what a wheel ships) and, when building in
        place (editable installs), beside the in-place _C."""
        record = {**self.record, "mode": build_mode(), "nvcc": find_nvcc(), "fusedformer": version()}
        text = json.dumps(record, indent=1) + "\n"
        dirs = {Path(self.build_lib) / "fusedformer"}
        if self.inplace:
            dirs.add(Path(self.get_finalized_command("build_py").get_package_dir("fusedformer")))
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / BUILD_RECORD).write_text(text)

    def _build_cuda(self, ext):
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build = Path(self.build_temp).resolve() / "csrc"
        build.mkdir(parents=True, exist_ok=True)

        targets = cuda_targets()
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(CSRC)]
        inc = " ".join(f"-I{p}" for p in includes)
        cuflags = " ".join([
            "-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden", *gencode_flags(targets),
        ])
        # _C.BUILT_ARCHS, what the availability check compares the GPU with (":"-separated: nvcc
        # splits option values at commas)
        cxxflags = ("-O2 -std=c++17 -Xcompiler=-fPIC -Xcompiler=-fvisibility=hidden "
                    f"-DFF_BUILT_ARCHS={':'.join(targets)}")
        objs, lines = [], []
        for src in sorted(ext.sources):
            src = (ROOT / src).resolve()
            obj = build / (src.name + ".o")
            objs.append(str(obj))
            rule = "cu" if src.suffix == ".cu" else "cxx"
            lines.append(f"build {obj}: {rule} {src}")
        # every header is an implicit dependency: editing one rebuilds the objects
        headers = " ".join(str(p) for p in sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h")]))
        ninja = "\n".join([
            f"nvcc = {nvcc}",
            "rule cu",
            f"  command = $nvcc {cuflags} {inc} -c $in -o $out",
            "  description = nvcc $in",
            "rule cxx",
            f"  command = $nvcc {cxxflags} {inc} -c $in -o $out",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc -shared -cudart static $in -o $out",
            "  description = link $out",
            *[line + (f" | {headers}" if headers else "") for line in lines],
            f"build {out}: link {' '.join(objs)}",
            "",
        ])
        (build / "build.ninja").write_text(ninja)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        ninja_bin = shutil.which("ninja")
        if ninja_bin is None:
            import ninja as ninja_pkg

            ninja_bin = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        _log(f"building fusedformer._C with {nvcc} ({', '.join(targets)}), {jobs} jobs "
             "(1-4 minutes on 2 cores)")
        subprocess.run([ninja_bin, "-C", str(build), "-j", jobs], check=True)
        return targets


def cuda_extensions():
    """The CUDA extension to build, or none, as FUSEDFORMER_BUILD_CUDA and the machine say (and
    the log says which, and why)."""
    mode = build_mode()
    if mode == "0":
        _log("FUSEDFORMER_BUILD_CUDA=0: no CUDA build, a pure-Python install (no fusedformer._C)")
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("fusedformer: FUSEDFORMER_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME, CUDA_PATH, "
                             "PATH, /usr/local/cuda)")
        _log("nvcc not found: no CUDA build (no fusedformer._C); the reference and triton backends still work")
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise SystemExit(f"fusedformer: nvcc found but {CSRC} has no sources (an incomplete source tree?)")
    _log(f"nvcc found at {nvcc}: building fusedformer._C (FUSEDFORMER_BUILD_CUDA={mode})")
    return [CudaExtension("fusedformer._C", sources=sources)]


# pip's build backend and `python setup.py` both run this file as __main__; the tests import it
# for find_nvcc without building anything
if __name__ == "__main__":
    setup(
        version=version(),
        **license_metadata(),
        package_dir={"": "python", "fusedformer.kernels": "kernels"},
        packages=find_packages("python") + ["fusedformer.kernels"],
        package_data={"fusedformer": ["data/*.txt", "py.typed"]},
        ext_modules=cuda_extensions(),
        cmdclass={"build_ext": BuildExt},
        zip_safe=False,
    )
