"""The GPU suite: every device measurement in one command, one folder, under 8 minutes.

    bash bench/gpu_suite.sh [OUT_DIR]            # on the GPU machine (installs with --no-deps -e .)
    python -m bench.gpu_suite --out-dir DIR      # the steps alone
    python -m bench.gpu_suite --dry-run          # the same steps at tiny shapes on CPU (CI)

Steps, each a fresh interpreter with its own time limit, run in order; a failing or
timed-out step is recorded and the suite goes on. Nothing needs the network or the
SmolLM2 wheel: every model is a random-init LLaMA shape.

    env          versions, nvidia-smi
    cuda_tests   pytest of the tests that skip without CUDA (-k "cuda or gpu")
    kernels      python -m bench.kernels (4096x4096 and 4096x11008, 3 and 4 bits)
    speed        python -m bench.speed --device cuda
    step         python -m bench.step --device cuda (skipped with a message if absent)
    ablation     python -m bench.ablation at full shape (CUDA max_memory_allocated)
    scale        python -m bench.scale --device cuda, 3 and 4 bits, both granularities
    fsdp         python -m bench.gpu_checks fsdp (FSDP2, one NCCL rank)
    offload      python -m bench.gpu_checks offload (pinned, non-blocking; bytes and time)

Output folder (at most 4 files, as the GPU machine returns 8): ``summary.json`` (every
step's command, exit code, seconds and parsed JSON result), ``suite.log`` (written by the
shell wrapper's tee), ``steps.tar.gz`` (each step's log and raw output files). Exit code
0 when every step passed or was skipped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # the whole suite; 8 minutes less the install and the tarball


@dataclass(frozen=True)
class Step:
    """One suite step: ``argv`` after ``python``; ``{W}`` is replaced by the step's work dir."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int
    needs: str | None = None  # a module that must exist, else the step is skipped
    env: tuple[tuple[str, str], ...] = ()


def gpu_steps() -> list[Step]:
    """The steps at full shape on CUDA (time limits sum to under `BUDGET_S`)."""
    return [
        Step("env", ("-c", _ENV_SNIPPET), 20),
        Step("cuda_tests", ("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                            "tests/test_offload.py", "tests/kernels/test_kernels.py", "--junitxml={W}/junit.xml"), 80),
        Step("kernels", ("-m", "bench.kernels", "--repeats", "3", "--out", "{W}/kernels.jsonl"), 70),
        Step("speed", ("-m", "bench.speed", "--device", "cuda", "--size", "4096", "--out", "{W}/speed.jsonl"), 40),
        Step("step", ("-m", "bench.step", "--device", "cuda", "--config", "configs/tiny.yaml", "--set",
                      "model.tiny_hidden=1024", "model.tiny_layers=4", "data.corpus={W}/corpus.txt",
                      "--out", "{W}/step.json"), 50, needs="bench.step"),
        Step("ablation", ("-m", "bench.ablation", "--rows", "naive,+orchestration,+uniquification,+rebuild",
                          "--repeats", "2", "--out", "{W}/ablation.json"), 60),
        Step("scale", ("-m", "bench.scale", "--device", "cuda", "--bits", "3", "4", "--cases", "plain", "per_tensor",
                       "per_grouped_channel", "--timeout", "40", "--out", "{W}/scale-cuda.json"), 90),
        Step("fsdp", ("-m", "bench.gpu_checks", "fsdp", "--device", "cuda", "--out", "{W}/fsdp.json"), 30),
        Step("offload", ("-m", "bench.gpu_checks", "offload", "--device", "cuda", "--out", "{W}/offload.json"), 30),
    ]


def dry_steps() -> list[Step]:
    """The same steps at tiny shapes on CPU, for CI (Triton under its interpreter)."""
    interp = (("TRITON_INTERPRET", "1"),)
    return [_generous(s) for s in [
        Step("env", ("-c", _ENV_SNIPPET), 20),
        Step("cuda_tests", ("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                            "tests/test_offload.py", "--junitxml={W}/junit.xml"), 60),
        Step("kernels", ("-m", "bench.kernels", "--device", "cpu", "--shapes", "64x96", "--bits", "3", "--repeats",
                         "1", "--out", "{W}/kernels.jsonl"), 60, env=interp),
        Step("speed", ("-m", "bench.speed", "--device", "cpu", "--quick", "--cases", "edkm", "--no-memory",
                       "--out", "{W}/speed.jsonl"), 60),
        Step("step", ("-m", "bench.step", "--device", "cpu", "--quick", "--set", "data.corpus={W}/corpus.txt",
                      "--out", "{W}/step.json"), 60, needs="bench.step"),
        Step("ablation", ("-m", "bench.ablation", "--size", "64", "--rows", "naive,+uniquification,+rebuild",
                          "--repeats", "1", "--out", "{W}/ablation.json"), 60),
        Step("scale", ("-m", "bench.scale", "--device", "cpu", "--quick", "--cases", "plain", "per_tensor",
                       "--out", "{W}/scale-cpu-quick.json"), 60),
        Step("fsdp", ("-m", "bench.gpu_checks", "fsdp", "--device", "cpu", "--hidden", "64", "--steps", "1",
                      "--out", "{W}/fsdp.json"), 60),
        Step("offload", ("-m", "bench.gpu_checks", "offload", "--device", "cpu", "--size", "64",
                         "--out", "{W}/offload.json"), 60),
    ]]


def _generous(step: Step) -> Step:
    """Dry-run limits: CI machines are shared, and the dry run checks the wiring, not speed."""
    return Step(step.name, step.argv, 3 * step.timeout_s, step.needs, step.env)


_ENV_SNIPPET = (
    "import json, platform, subprocess, torch\n"
    "try:\n    import triton\n    tv = triton.__version__\nexcept ImportError:\n    tv = None\n"
    "gpu = torch.cuda.is_available()\n"
    "smi = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True) if gpu else None\n"
    "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'triton': tv,\n"
    "    'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,\n"
    "    'nvidia_smi': smi.stdout.strip() if smi else None}))\n"
)


def _corpus(work: Path) -> None:
    """A local text file for bench.step's byte tokenizer (no network, no corpus package)."""
    texts = [p.read_text(errors="replace") for p in sorted(REPO.glob("edkm/**/*.py"))]
    (work / "corpus.txt").write_text("\n".join(texts))


def _result(work: Path, step: Step) -> object:
    """The step's JSON output (a file named in its argv), parsed; None if there is none."""
    for arg in step.argv:
        if arg.startswith("{W}/") and arg.endswith((".json", ".jsonl")):
            path = work / arg[len("{W}/"):]
            if path.exists():
                text = path.read_text().strip()
                try:
                    return json.loads(text) if arg.endswith(".json") else [json.loads(x) for x in text.splitlines()]
                except json.JSONDecodeError:
                    return {"unparsed": text[-2000:]}
    return None


def run_step(step: Step, work: Path, timeout_s: float) -> dict:
    """Run one step; its output streams to stdout and to ``work/<name>.log``. Returns its record."""
    if step.needs and importlib.util.find_spec(step.needs) is None:
        print(f"[suite] {step.name}: SKIPPED (module {step.needs} is not in this tree)", flush=True)
        return {"name": step.name, "status": "skipped", "reason": f"module {step.needs} missing"}
    if timeout_s < 5:
        print(f"[suite] {step.name}: SKIPPED (suite budget spent)", flush=True)
        return {"name": step.name, "status": "skipped", "reason": "suite time budget spent"}
    argv = [sys.executable, *(a.replace("{W}", str(work)) for a in step.argv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(step.env)}
    shown = "python -c <env snippet>" if step.argv[0] == "-c" else "python " + " ".join(argv[1:])
    print(f"[suite] {step.name}: {shown} (limit {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(work / f"{step.name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in _lines(proc, t0 + timeout_s):
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait(timeout=max(0.1, t0 + timeout_s - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    status = "timeout" if rc is None else ("passed" if rc == 0 else "failed")
    print(f"[suite] {step.name}: {status.upper()} (rc {rc}, {seconds:.1f} s)", flush=True)
    return {"name": step.name, "status": status, "rc": rc, "seconds": round(seconds, 2),
            "argv": argv[1:], "result": _result(work, step)}


def _lines(proc: subprocess.Popen, deadline: float):
    """Lines of ``proc``'s output until it ends or ``deadline`` passes (then TimeoutExpired)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, 0)
        if sel.select(timeout=min(left, 1.0)):
            line = proc.stdout.readline()
            if not line:
                return
            yield line
        elif proc.poll() is not None:
            rest = proc.stdout.read()
            if rest:
                yield rest
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu-suite"),
                   help="folder for summary.json and steps.tar.gz (default $OUT, else bench/results/gpu-suite)")
    p.add_argument("--dry-run", action="store_true", help="the same steps at tiny shapes on CPU (CI)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (by name)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all steps (default {BUDGET_S}; 1800 with --dry-run)")
    args = p.parse_args(argv)
    steps = dry_steps() if args.dry_run else gpu_steps()
    names = [s.name for s in steps]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps are {names}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here; use --dry-run for the CPU rehearsal")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.budget = args.budget or (1800 if args.dry_run else BUDGET_S)
    deadline = time.perf_counter() + args.budget
    records = []
    with tempfile.TemporaryDirectory(prefix="edkm-gpu-suite-") as tmp:
        work = Path(tmp)
        _corpus(work)
        for step in steps:
            if args.only and step.name not in args.only:
                continue
            records.append(run_step(step, work, min(step.timeout_s, deadline - time.perf_counter())))
        (work / "corpus.txt").unlink()
        with tarfile.open(out / "steps.tar.gz", "w:gz") as tar:
            tar.add(work, arcname="steps")
    summary = {"dry_run": args.dry_run, "budget_s": args.budget, "commit": _commit(),
               "passed": sum(r["status"] == "passed" for r in records),
               "failed": [r["name"] for r in records if r["status"] in ("failed", "timeout")],
               "skipped": [r["name"] for r in records if r["status"] == "skipped"], "steps": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"[suite] {summary['passed']} passed, failed {summary['failed']}, skipped {summary['skipped']}; "
          f"wrote {out / 'summary.json'}", flush=True)
    return 1 if summary["failed"] else 0


def _commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
