"""Packaging: the sdist carries every source the build reads, wheels built from it, the
FUSEDFORMER_BUILD_CUDA modes and their record, and `make`'s set-up on a machine whose python3
is a virtualenv that already has torch.

The CUDA wheel built from the sdist compiles _C (minutes on 2 cores), so it runs only when asked
for: FUSEDFORMER_TEST_CUDA_WHEEL=1. Every other test here takes seconds."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from _cuda_build import NVCC

ROOT = Path(__file__).resolve().parents[1]


def _backend(call, cwd, out, env=None):
    """setuptools' PEP 517 hook ``call`` ('build_sdist' / 'build_wheel') run in ``cwd``, as pip
    runs it with --no-build-isolation. Returns (path of what it built, its log)."""
    code = f"from setuptools import build_meta; print(build_meta.{call}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(out) / proc.stdout.strip().splitlines()[-1], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    path, _ = _backend("build_sdist", ROOT, out)
    with tarfile.open(path) as tar:
        tar.extractall(out, filter="data")
    (unpacked,) = [p for p in out.iterdir() if p.is_dir()]
    return path, unpacked


def _sources():
    """What the build reads, relative to the repository root."""
    files = [*ROOT.glob("csrc/*"), *ROOT.glob("kernels/*.py"), *ROOT.glob("python/fusedformer/**/*.py"),
             *ROOT.glob("python/fusedformer/data/*"), ROOT / "python/fusedformer/py.typed", ROOT / "LICENSE",
             ROOT / "setup.py", ROOT / "pyproject.toml"]
    return sorted(str(p.relative_to(ROOT)) for p in files if "__pycache__" not in p.parts)


def test_sdist_carries_every_build_source(sdist):
    _, unpacked = sdist
    missing = [f for f in _sources() if not (unpacked / f).is_file()]
    assert not missing, f"the sdist lacks {missing}"


def test_every_include_of_csrc_resolves_inside_the_sdist(sdist):
    """The compile's own includes ("..."), followed from every source: the headers a wheel
    built from the sdist needs (the full compile is the opt-in test below)."""
    csrc = sdist[1] / "csrc"
    todo, seen = [p.name for p in csrc.iterdir() if p.suffix in (".cu", ".cpp")], set()
    assert todo
    while todo:
        name = todo.pop()
        assert (csrc / name).is_file(), f"csrc/{name} is included but not in the sdist"
        seen.add(name)
        todo += [inc for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', (csrc / name).read_text(), re.M)
                 if inc not in seen]
    assert any(n.endswith(".cuh") for n in seen) and "ops.h" in seen


def test_pure_wheel_from_the_sdist(sdist, tmp_path):
    wheel, log = _backend("build_wheel", sdist[1], tmp_path, {"FUSEDFORMER_BUILD_CUDA": "0"})
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("fusedformer/__init__.py", "fusedformer/kernels/attention.py", "fusedformer/py.typed",
                   "fusedformer/data/lighthouse.txt", "fusedformer/_version.py"):
        assert needed in names
    assert not [n for n in names if "/_C" in n or n.endswith("_build.json")]
    assert "FUSEDFORMER_BUILD_CUDA=0" in log
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    import fusedformer

    assert f"Version: {fusedformer.__version__}" in meta
    assert re.search(r"^License(-Expression)?: Apache-2.0$", meta, re.M)


@pytest.mark.skipif(os.environ.get("FUSEDFORMER_TEST_CUDA_WHEEL") != "1" or NVCC is None,
                    reason="compiles _C from the sdist (minutes): set FUSEDFORMER_TEST_CUDA_WHEEL=1 with nvcc")
def test_cuda_wheel_from_the_sdist(sdist, tmp_path):
    env = {"FUSEDFORMER_BUILD_CUDA": "1", "FUSEDFORMER_CUDA_ARCHS": "80", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    wheel, log = _backend("build_wheel", sdist[1], tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if re.fullmatch(r"fusedformer/_C\..*\.so", n)], names
    record = json.loads(zipfile.ZipFile(wheel).read("fusedformer/_build.json"))
    assert record["cuda_build"] == "built" and record["targets"] == ["sm_80", "compute_80"]
    assert "built fusedformer._C in" in log


def _setup_py(env, *args):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_unknown_build_mode_is_refused():
    proc = _setup_py({"FUSEDFORMER_BUILD_CUDA": "maybe"}, "--version")
    assert proc.returncode != 0 and "FUSEDFORMER_BUILD_CUDA='maybe'" in proc.stderr


@pytest.mark.skipif(NVCC is None, reason="needs nvcc: the build must start to fail")
@pytest.mark.parametrize("mode", ["auto", "1"])
def test_failed_cuda_build_is_loud_or_fatal(mode, tmp_path):
    """A build that fails (here: an architecture nvcc cannot take) is fatal with 1; with auto the
    install goes on without _C, a banner says so and the record says why."""
    lib = tmp_path / "lib"
    proc = _setup_py({"FUSEDFORMER_BUILD_CUDA": mode, "FUSEDFORMER_CUDA_ARCHS": "sm_nope"}, "build_ext",
                     "--build-lib", str(lib), "--build-temp", str(tmp_path / "tmp"))
    if mode == "1":
        assert proc.returncode != 0
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the CUDA build FAILED" in proc.stderr
    record = json.loads((lib / "fusedformer" / "_build.json").read_text())
    assert record["cuda_build"] == "failed" and record["mode"] == "auto" and "nope" in record["error"]
    assert not list((lib / "fusedformer").glob("_C*"))


def test_a_failed_build_is_the_cuda_backends_reason(monkeypatch):
    from fusedformer import _build_info

    monkeypatch.setattr(_build_info, "build_record", lambda: {"cuda_build": "failed", "error": "nvcc: boom"})
    assert "the CUDA build failed at install time (nvcc: boom)" in _build_info.missing_extension_reason()
    monkeypatch.setattr(_build_info, "build_record", lambda: None)
    assert "not built" in _build_info.missing_extension_reason()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_keeps_the_torch_of_a_virtualenv_python(tmp_path):
    """The machine where python3 is a virtualenv whose torch the new .venv must keep (here its
    torch comes through a .pth file, as in this checkout's venv), and whose venvs seed an old
    setuptools without `wheel` (Python 3.11): `make venv` must give a .venv that imports that
    very torch and can install fusedformer."""
    base = getattr(sys, "_base_executable", sys.executable)
    outer = tmp_path / "outer"
    subprocess.run([base, "-m", "venv", "--without-pip", str(outer)], check=True, timeout=300)
    outer_python = outer / "bin" / "python"
    site = subprocess.run([outer_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch and its site-packages neighbours, but no build tools: the venv must bring its own
    kept = tmp_path / "kept"
    kept.mkdir()
    for entry in Path(torch.__file__).parents[1].iterdir():
        if not re.match(r"(setuptools|wheel|pkg_resources|_distutils_hack|distutils-precedence|pip)\b", entry.name):
            (kept / entry.name).symlink_to(entry)
    (Path(site) / "torch_elsewhere.pth").write_text(f"{kept}\n")
    inner = tmp_path / "inner"
    env = {**os.environ, "FUSEDFORMER_BUILD_CUDA": "0"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["make", "-C", str(ROOT), "venv", f"PYTHON={outer_python}", f"VENV={inner}", "TEST_DEPS="],
                          capture_output=True, text=True, timeout=900, env=env)
    if "cannot install the build requirements" in proc.stdout and "ERROR: Could not find" in proc.stderr:
        pytest.skip("the package index is unreachable: the venv cannot get setuptools/wheel")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"keeping the installed torch {torch.__version__}" in proc.stdout
    check = "import torch, fusedformer; print(torch.__version__, torch.__file__, fusedformer.__file__)"
    got = subprocess.run([inner / "bin" / "python", "-c", check], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    version, torch_file, ff_file = got.stdout.split()
    assert version == torch.__version__ and Path(torch_file).resolve() == Path(torch.__file__).resolve()
    assert Path(ff_file).is_relative_to(ROOT / "python")


# --------------------------------------------------------------------------------------------
# integration: attn_implementation="fusedformer" after `import fusedformer`
# --------------------------------------------------------------------------------------------

_TINY_GPT2 = """
import sys, tempfile, torch
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from fusedformer.patch import hf
cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
ids = torch.randint(0, 64, (2, 9))
want = eager(ids).logits
assert ALL_ATTENTION_FUNCTIONS["fusedformer"] is hf.fusedformer_attention_forward
with tempfile.TemporaryDirectory() as d:
    eager.save_pretrained(d)
    loaded = AutoModelForCausalLM.from_pretrained(d, attn_implementation="fusedformer").eval()
assert loaded.config._attn_implementation == "fusedformer"
torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
eager.set_attn_implementation("fusedformer")
assert eager.config._attn_implementation == "fusedformer"
torch.testing.assert_close(eager(ids).logits, want, atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("first", ["fusedformer", "transformers"])
def test_attn_implementation_fusedformer_after_import(first):
    """Either import order: `import fusedformer` first must not import transformers, and then
    from_pretrained(attn_implementation="fusedformer") and set_attn_implementation work."""
    pytest.importorskip("transformers")
    before = ("import sys, fusedformer; assert 'transformers' not in sys.modules\n" if first == "fusedformer"
              else "import transformers.modeling_utils, fusedformer\n")
    proc = subprocess.run([sys.executable, "-c", before + _TINY_GPT2], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# floors: no extra replaces torch; each Triton kernel family checks the installed triton
# --------------------------------------------------------------------------------------------


def test_no_extra_can_make_pip_replace_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            assert name != "torch", f"extra [{extra}] names torch: {requirement}"
            # a floor on triton above the installed torch's own triton resolves by replacing torch
            assert name != "triton" or requirement.strip().lower() == "triton", f"[{extra}]: {requirement}"
    assert [r for r in project["dependencies"] if r.startswith("torch")] == ["torch>=2.5"]


def test_triton_floors():
    from fusedformer._backends.triton_floors import floor_reason

    assert "older than 3.4" in floor_reason("linear_act", "3.3.1") and "tensor_descriptor" in floor_reason(
        "linear_act", "3.3.1")
    assert floor_reason("linear_act", "3.4.0") is None and floor_reason("softmax", "3.1.0+git4a1b") is None
    assert "older than 3.1" in floor_reason("softmax", "3.0.0")
    assert "cache_results" in floor_reason("attention", "3.3.1") and floor_reason("attention", "3.4.1") is None


def test_a_triton_below_a_floor_declines_that_family_with_its_reason(monkeypatch):
    import triton
    from fusedformer import backends

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    # the floors are cached per process: a copy of the cache without them, the original put back after
    kept = {k: v for k, v in backends._cache.items() if k[0] != "_triton_floor_reason"}
    monkeypatch.setattr(backends, "_cache", kept)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    reason = backends.unsupported_reason("triton", "linear_act", "cpu", (x, w, None, "gelu"))
    assert reason.startswith("triton 3.3.1 is older than 3.4: the Triton GEMM")
    with pytest.raises(ValueError, match="older than 3.4"):
        backends.select("linear_act", "cpu", (x, w, None, "gelu"), backend="triton")
    assert backends.unsupported_reason("triton", "softmax", "cpu", (x, -1)) is None


def test_the_floors_name_what_the_kernels_use():
    """Each 3.4 floor names what the kernels use from triton 3.4 (absent from the 3.3.1 wheel): the
    GEMM's host tensor descriptors, the attention autotuner's cache_results."""
    assert "from triton.tools.tensor_descriptor import TensorDescriptor" in (ROOT / "kernels/matmul_act.py").read_text()
    assert "cache_results" in (ROOT / "kernels/_autotune.py").read_text()
    assert "_autotune" in (ROOT / "kernels/attention.py").read_text()


def test_test_files_of_a_family_below_its_floor_are_not_collected(monkeypatch):
    import triton

    import conftest

    assert all(list((ROOT / "tests").glob(g)) for globs in conftest.TRITON_FAMILY_TESTS.values() for g in globs)
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert {"test_triton_attention*.py", "test_triton_linear_act.py"} <= set(conftest._below_triton_floor())
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    assert conftest._below_triton_floor() == []
