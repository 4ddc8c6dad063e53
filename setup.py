"""fusedformer's build.

The Python package always installs. When nvcc is found, csrc/ is compiled into
``fusedformer._C`` with nvcc + pybind11 through a generated ninja file. ``_C`` links the CUDA
runtime statically and nothing of libtorch: launchers take raw pointers, sizes, strides and a
stream handle, so one build serves every torch version.

Environment:
  FUSEDFORMER_BUILD_CUDA   0 skips the CUDA build; 1 makes a failed build fatal (default: auto,
                           build when nvcc is found, warn and go on without _C if it fails)
  FUSEDFORMER_CUDA_ARCHS   semicolon/comma separated, e.g. "80;90a" (default "80;90a"); PTX of
                           the newest is added for later GPUs (cuda_targets())
  MAX_JOBS                 parallel compile jobs (default: CPU count)
  CUDA_HOME / CUDA_PATH    where to look for bin/nvcc before PATH
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _log(msg):
    print(f"fusedformer: {msg}", file=sys.stderr, flush=True)


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


class BuildExt(build_ext):
    def build_extensions(self):
        failed = []
        for ext in self.extensions:
            if not isinstance(ext, CudaExtension):
                self.build_extension(ext)
                continue
            try:
                self._build_cuda(ext)
            except Exception as exc:  # a broken toolchain must not break `pip install`
                if os.environ.get("FUSEDFORMER_BUILD_CUDA") == "1":
                    raise
                _log(f"CUDA build failed ({exc}); installing without fusedformer._C "
                     "(set FUSEDFORMER_BUILD_CUDA=1 to make this fatal)")
                failed.append(ext)
        # what failed is not installed: setuptools must not look for its output
        self.extensions = [ext for ext in self.extensions if ext not in failed]

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
        _log(f"building fusedformer._C with {nvcc} ({', '.join(targets)}), {jobs} jobs")
        subprocess.run([ninja_bin, "-C", str(build), "-j", jobs], check=True)


def cuda_extensions():
    mode = os.environ.get("FUSEDFORMER_BUILD_CUDA", "auto")
    if mode == "0":
        _log("FUSEDFORMER_BUILD_CUDA=0: skipping the CUDA extension (fusedformer._C)")
        return []
    if find_nvcc() is None:
        _log("nvcc not found: skipping the CUDA extension (fusedformer._C); "
             "the reference and triton backends still work")
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    if not sources:
        _log("csrc/ has no sources: nothing to build for fusedformer._C")
        return []
    return [CudaExtension("fusedformer._C", sources=sources)]


# pip's build backend and `python setup.py` both run this file as __main__; the tests import it
# for find_nvcc without building anything
if __name__ == "__main__":
    setup(
        package_dir={"": "python", "fusedformer.kernels": "kernels"},
        packages=find_packages("python") + ["fusedformer.kernels"],
        package_data={"fusedformer": ["data/*.txt"]},
        ext_modules=cuda_extensions(),
        cmdclass={"build_ext": BuildExt},
        zip_safe=False,
    )
