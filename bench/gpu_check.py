"""The prepared GPU check: one command, under 8 minutes on one GPU (`make gpu-check`).

    .venv/bin/python bench/gpu_check.py [--budget-s 470] [--device cuda]

Runs, each with its own time limit, and collects what each reports:

1. the real CUDA encoder test (tests/test_encode.py, the tests skipped without a GPU);
2. bench/encoder.py for kaiko ViT-S/16, UNI, Virchow and GigaPath in their precision: stage
   and raw forward tiles/s, stage/raw, fraction of the GPU's fp16 peak at the best batch size;
3. bench/slide_encoder.py at 10k and 100k tiles in fp16;
4. bench/end_to_end.py with the zero-cost encoder (bench-null: the pipeline's ceiling) and with
   UNI (the job's rate vs the encoder alone).

Writes bench/results/gpu_check_<gpu>.json with every step's exit code, wall time, its last
output lines and its result file, and prints the figures the targets are about (bench/README
"GPU check"). A step that fails or runs out of time is recorded as such; the rest still run.
``--device cpu`` runs the same steps at toy sizes, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def steps(device: str) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget)."""
    cuda = device == "cuda"
    models = ["kaiko-vits16", "uni", "virchow", "gigapath"] if cuda else ["kaiko-vits16"]
    sizes = ["128", "256", "512"] if cuda else ["8"]
    return [
        ("cuda_encoder_test", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_encode.py", "-k", "cuda"], 0.10),
        ("encoder", [PY, "bench/encoder.py", "--device", device, "--models", *models,
                     "--batch-sizes", *sizes, "--seconds", "1.5" if cuda else "0.5",
                     "--repeats", "2", "--warmup", "2",
                     "--out", str(RESULTS / f"gpu_check_encoder_{device}.json")], 0.40),
        ("slide_encoder", [PY, "bench/slide_encoder.py", "--device", device,
                           "--dtype", "fp16" if cuda else "fp32", "--tiles",
                           *(["10000", "100000"] if cuda else ["2000"]),
                           "--out", str(RESULTS / f"gpu_check_slide_encoder_{device}.json")],
         0.12),
        ("job_bench_null", [PY, "bench/end_to_end.py", "--model", "bench-null", "--slide",
                            "20x_10k", "--slides", "6" if cuda else "1",
                            "--batch-size", "256" if cuda else "32",
                            "--encoder-seconds", "5" if cuda else "2",
                            "--kind", f"gpu_check_job_bench_null_{device}"], 0.19),
        ("job_uni", [PY, "bench/end_to_end.py", "--model", "uni" if cuda else "kaiko-vits16",
                     "--slide", "20x_10k", "--slides", "6" if cuda else "1",
                     "--batch-size", "256" if cuda else "32",
                     "--encoder-seconds", "10" if cuda else "2",
                     "--kind", f"gpu_check_job_uni_{device}"], 0.19),
    ]


def run_step(name: str, cmd: list[str], limit_s: float) -> dict[str, Any]:
    started = time.monotonic()
    print(f"== {name} (limit {limit_s:.0f} s): {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        out = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
               else (err.stdout or "")) + ((err.stderr or b"").decode(errors="replace")
                                           if isinstance(err.stderr, bytes)
                                           else (err.stderr or ""))
    wall = time.monotonic() - started
    lines = [ln for ln in out.splitlines() if ln.strip()]
    wrote = [m.group(1) for m in (re.search(r"wrote (\S+\.json)", ln) for ln in lines) if m]
    print("\n".join(lines[-12:]), flush=True)
    print(f"== {name}: rc={rc} in {wall:.0f} s", flush=True)
    return {"rc": rc, "wall_s": round(wall, 1), "tail": lines[-40:], "result_files": wrote}


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - recorded as unknown
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--budget-s", type=float, default=470.0,
                    help="total time for all steps (each gets its share)")
    args = ap.parse_args()
    name = gpu_name()
    if args.device == "cuda" and name in {"cpu", "unknown"}:
        print("gpu-check: no GPU visible (torch.cuda.is_available() is False): nothing run")
        return 2
    started = time.time()
    report: dict[str, Any] = {"gpu": name, "device": args.device, "started_at": started,
                              "budget_s": args.budget_s, "steps": {}}
    for step, cmd, share in steps(args.device):
        report["steps"][step] = run_step(step, cmd, args.budget_s * share)
    report["wall_s"] = round(time.time() - started, 1)
    safe = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"gpu_check_{safe}.json"
    dest.write_text(json.dumps(report, indent=2))
    failed = [s for s, r in report["steps"].items() if r["rc"] != 0]
    print(f"\ngpu-check on {name}: {len(report['steps']) - len(failed)} of "
          f"{len(report['steps'])} steps passed in {report['wall_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; wrote {dest}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
