#!/usr/bin/env python3
"""The GPU check: one command, a fixed time budget, and its files always written.

    python3 benchmarks/gpu_check.py --out DIR [--seconds N] [--only STEP,...] [--tests PATTERN]
                                    [--op OP]... [--skip-build] [--test-timeout S]

The budget (--seconds, else $GPU_CHECK_SECONDS, else 420) is shared by the steps below, in this
order. Each step gets its weight's share of the time still left (so what one step leaves unused
goes to the later ones), runs as its own process group and is killed with all its children at
that cap; a step whose share is below its minimum is cut without starting. The command ends
inside the budget and summary.md names every step cut or killed.

  probe           GPU name, capability, SMs, memory, driver / CUDA / nvcc / torch / triton versions
  build           pip install -e . (fusedformer._C with MAX_JOBS = every core), `fusedformer info`
  parity          every op x backend x dtype against the float64 oracle, every op before any twice
  tests-gpu       the GPU-marked tests, the most informative files first, a timeout per test
  bench-headline  `fusedformer bench --headline` beside the copy and matmul ceilings
  bench-e2e       a patched GPT-2 training step against Hugging Face eager
  bench-overhead  host and device time per op call on tiny tensors beside torch's (bench_overhead.py;
                  its table is in check.log): can patched models beat eager at decode shapes?
  tests-rest      the rest of the suite (on a GPU the triton tests run compiled), triton first
  bench-sweep     `fusedformer bench --full`, as far as the time goes

Without a GPU the steps that need one are skipped, saying so; parity runs triton interpreted.
Files under DIR (rewritten after every step): summary.md, results.json (the results format of
benchmarks/results/README.md, kind "check"), junit.xml (the test steps) and check.log (every
step's output); gpu_check_report.py writes them. Exit status: 0 every step that ran passed and
none was cut, 1 a step failed or was killed at its cap, 2 none failed but one was cut.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_report import BENCH_STEPS, TEST_STEPS, TESTLOG_ENV, write_files

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECONDS = 420
RESERVE_S = 3.0  # kept back from the steps for writing the files at the end
OUT_FILES = ("summary.md", "results.json", "junit.xml", "check.log")


@dataclasses.dataclass
class Step:
    name: str
    weight: float  # share of the time left, against the steps still to run
    min_s: float  # below this a start is pointless: the step is cut instead
    needs_gpu: bool


STEPS = (Step("probe", 0.04, 15, False), Step("build", 0.20, 20, False), Step("parity", 0.16, 10, False),
         Step("tests-gpu", 0.14, 10, False), Step("bench-headline", 0.28, 20, True), Step("bench-e2e", 0.08, 15, True),
         Step("bench-overhead", 0.04, 15, True), Step("tests-rest", 0.05, 10, True),
         Step("bench-sweep", 0.05, 10, True))
STEP_NAMES = tuple(s.name for s in STEPS)
# files first in their test step: the CUDA kernels have never run anywhere, the triton ones only
# interpreted; the model-level tests follow
GPU_TESTS_FIRST = ("test_cuda_backend.py", "test_parity.py", "test_triton_softmax.py", "test_triton_norms.py",
                   "test_triton_linear_act.py", "test_feed_forward.py", "test_patch_hf.py")
REST_TESTS_FIRST = ("test_triton_attention.py", "test_triton_softmax.py", "test_triton_norms.py",
                    "test_triton_linear_act.py", "test_feed_forward.py", "test_ops.py", "test_compile.py")


# --------------------------------------------------------------------------------------------
# the probe (run as `gpu_check.py --probe FILE`, in its own process: importing torch may hang)
# --------------------------------------------------------------------------------------------


def _output(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not run ({exc.__class__.__name__})"


def probe(path):
    import importlib.metadata
    import platform

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "nvidia_smi": _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                   "--format=csv,noheader"]), "gpu": False}
    sys.path.insert(0, str(ROOT))
    from setup import find_nvcc  # setup.py runs setup() only as __main__

    nvcc = find_nvcc()
    info["nvcc"] = (_output([nvcc, "--version"]) or "").splitlines()[-1] if nvcc else "not found"
    for package in ("triton", "transformers", "pytest_timeout"):
        try:
            info[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    info["device"] = f"cpu ({platform.machine()}) — no CUDA GPU visible"
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            info.update(gpu=True, device=props.name, capability=f"{props.major}.{props.minor}",
                        sm_count=props.multi_processor_count, gpu_count=torch.cuda.device_count(),
                        memory_free_gib=round(free / 2**30, 1), memory_total_gib=round(total / 2**30, 1))
    except Exception as exc:  # the probe reports what it could not find; it never fails the check
        info["torch_error"] = f"{exc.__class__.__name__}: {exc}"
    try:
        import fusedformer

        info["fusedformer"] = fusedformer.__version__
        import fusedformer._C  # noqa: F401
        info["fusedformer_C"] = "importable"
    except Exception as exc:
        info.setdefault("fusedformer", None)
        info["fusedformer_C"] = f"{exc.__class__.__name__}: {exc}"
    Path(path).write_text(json.dumps(info, indent=1))


# --------------------------------------------------------------------------------------------
# running a step under its cap
# --------------------------------------------------------------------------------------------


def kill_group(proc):
    """SIGKILL to the step's whole process group (pytest's workers, compile subprocesses): nothing of
    a killed step outlives its cap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_capped(cmd, seconds, log, env):
    """Run ``cmd`` in its own process group with stdout and stderr going to ``log``; its exit code,
    or None when it was killed at ``seconds``."""
    log.write(f"\n$ {' '.join(map(str, cmd))}   (cap {seconds:.0f} s)\n")
    log.flush()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(0.0, seconds))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None
    except BaseException:  # the check itself is being stopped: take the step down with it
        kill_group(proc)
        raise


def run_step(commands, cap, log, env, ok_codes=(0,)):
    """The commands in turn, all under one cap: (status, note)."""
    t_end = time.monotonic() + cap
    for cmd in commands:
        rc = run_capped(cmd, t_end - time.monotonic(), log, env)
        if rc is None:
            return "timeout", f"killed at its {cap:.0f} s cap"
        if rc not in ok_codes:
            return "failed", f"exit {rc}: {' '.join(map(str, cmd[:4]))}"
    return "ok", ""


def fair_cap(step, left, later):
    """The step's share of ``left`` seconds against the steps still to run (``later``, itself
    included), at least its minimum; None when not even that is left."""
    if left < step.min_s:
        return None
    share = left * step.weight / sum(s.weight for s in later)
    return min(left, max(step.min_s, share))


# --------------------------------------------------------------------------------------------
# the steps' commands
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    args: argparse.Namespace
    scratch: Path  # the steps' own files; OUT gets only the four files
    env: dict
    probe: dict = dataclasses.field(default_factory=dict)
    steps: list = dataclasses.field(default_factory=list)  # {name, status, seconds, cap, note}

    def test_files(self, first, gpu_marked):
        files = sorted((ROOT / "tests").glob("test_*.py"))
        if gpu_marked:
            files = [f for f in files if "pytest.mark.gpu" in f.read_text()]
        else:  # this check's own test would run the check again
            files = [f for f in files if f.name != "test_gpu_check.py"]
        rank = {name: i for i, name in enumerate(first)}
        return [f.relative_to(ROOT) for f in sorted(files, key=lambda f: (rank.get(f.name, len(first)), f.name))]

    def commands(self, name, cap):
        """(commands, exit codes that pass) of step ``name`` under ``cap`` seconds."""
        py, a = sys.executable, self.args
        ops = [x for op in a.op or () for x in ("--op", op)]
        # a worker stops by itself a little before its cap, listing what it did not reach
        worker = [py, "-m", "fusedformer.bench.check", "--out", self.scratch / f"{name}.jsonl",
                  "--seconds", f"{max(1.0, cap - 5):.0f}"]
        if name == "probe":
            return [[py, Path(__file__).resolve(), "--probe", self.scratch / "probe.json"]], (0,)
        if name == "build":
            return [[py, "-m", "pip", "install", "--disable-pip-version-check", "--no-build-isolation", "--no-deps",
                     "-e", ROOT], [py, "-m", "fusedformer", "info"], [py, "-c", "import fusedformer._C"]], (0,)
        if name == "parity":
            return [[*worker, "parity", *ops]], (0,)
        if name in BENCH_STEPS:
            return [[*worker, "bench", "--preset", BENCH_STEPS[name], *ops]], (0,)
        if name == "bench-e2e":
            return [[*worker, "e2e", "--script", ROOT / "benchmarks" / "bench_e2e.py"]], (0,)
        if name == "bench-overhead":
            return [[py, ROOT / "benchmarks" / "bench_overhead.py", "--part", "ops", "--backends", "triton", "torch",
                     "--reps", "5"]], (0,)
        gpu = name == "tests-gpu"
        pytest = [py, "-m", "pytest", "-p", "gpu_check_report", "-p", "no:cacheprovider", "-q", "-m",
                  "gpu" if gpu else "not gpu"]
        if self.probe.get("pytest_timeout"):
            pytest.append(f"--timeout={a.test_timeout}")
        if a.tests:
            pytest += ["-k", a.tests]
        # exit 5: nothing collected (every test deselected), not a failure
        return [pytest + self.test_files(GPU_TESTS_FIRST if gpu else REST_TESTS_FIRST, gpu)], (0, 5)

    def step_env(self, name):
        env = dict(self.env)
        if name in TEST_STEPS:
            env[TESTLOG_ENV] = str(self.scratch / f"{name}.tests.jsonl")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), env.get("PYTHONPATH")]))
        return env




# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


def skip_reason(check, step):
    """(status, note) when ``step`` does not run at all in this check, else None."""
    a = check.args
    build_needed = step.name == "build" and not check.probe.get("fusedformer")  # a fresh machine
    if a.only and step.name not in a.only and step.name != "probe" and not build_needed:
        return "not selected", "--only"
    if step.name == "build" and a.skip_build:
        return "skipped", "--skip-build"
    if step.needs_gpu and not check.probe.get("gpu"):
        return "skipped", "no CUDA GPU visible (the probe saw none)"
    return None


def run_steps(check, log, deadline, save):
    for i, step in enumerate(STEPS):
        t_start, cap = time.monotonic(), None
        skipped = skip_reason(check, step)
        if skipped:
            status, note = skipped
        else:
            later = [s for s in STEPS[i:] if not skip_reason(check, s)]
            left = deadline - t_start
            cap = fair_cap(step, left, later)
            if cap is None:
                status, note = "cut", f"{max(left, 0):.0f} s left, it needs {step.min_s:.0f}"
            else:
                log.write(f"\n== {step.name} (cap {cap:.0f} s)\n")
                commands, ok = check.commands(step.name, cap)
                status, note = run_step(commands, cap, log, check.step_env(step.name), ok)
                log.write(f"== {step.name}: {status} {note} ({time.monotonic() - t_start:.0f} s)\n")
                log.flush()
        if step.name == "probe":
            check.probe = load_probe(check.scratch / "probe.json")
            if not check.probe.get("gpu"):  # the triton kernels run interpreted on a CPU
                check.env.setdefault("TRITON_INTERPRET", "1")
        check.steps.append({"name": step.name, "status": status, "seconds": round(time.monotonic() - t_start, 1),
                            "cap": round(cap) if cap else None, "note": note})
        save()


def load_probe(path):
    """The probe's findings; when it did not finish, whether nvidia-smi exists stands in for the GPU."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {"gpu": shutil.which("nvidia-smi") is not None, "probe": "did not finish"}


def exit_status(steps):
    statuses = {s["status"] for s in steps}
    return 1 if statuses & {"failed", "timeout"} else 2 if "cut" in statuses else 0


def step_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the four files (required)")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("GPU_CHECK_SECONDS", DEFAULT_SECONDS)),
                   help="the whole check's budget (default: $GPU_CHECK_SECONDS, else %(default)s)")
    p.add_argument("--only", type=step_list, help="only these steps, comma-separated (the probe always runs; "
                                                  "the build too when fusedformer does not import)")
    p.add_argument("--tests", help="the test steps run only tests matching this pytest -k expression")
    p.add_argument("--op", action="append", help="parity and bench steps: only this op (repeatable)")
    p.add_argument("--skip-build", action="store_true", help="use the fusedformer already installed")
    p.add_argument("--test-timeout", type=float, default=120, help="seconds per test (pytest-timeout)")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # the probe step's own process writes here
    args = p.parse_args(argv)
    if not args.probe and not args.out:
        p.error("--out DIR is required")
    if args.seconds <= RESERVE_S:
        p.error(f"--seconds must be more than {RESERVE_S:.0f}")
    return args


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the running step (killed) to the file writing


def main(argv=None):
    t_start = time.monotonic()
    args = parse_args(argv)
    if args.probe:
        probe(args.probe)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAX_JOBS": str(os.cpu_count() or 1)}
    check = Check(args, scratch, env)

    def save():
        write_files(check, out, date, time.monotonic() - t_start)

    signal.signal(signal.SIGTERM, _stop)
    try:
        with open(out / "check.log", "w") as log:
            log.write(f"# gpu_check {date}: budget {args.seconds:.0f} s, argv {sys.argv[1:]}\n")
            run_steps(check, log, t_start + args.seconds - RESERVE_S, save)
    finally:
        save()
        shutil.rmtree(scratch, ignore_errors=True)
    return exit_status(check.steps)


if __name__ == "__main__":
    sys.exit(main())
