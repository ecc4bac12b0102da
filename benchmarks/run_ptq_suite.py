"""Run a list of PTQ command lines, each in its own process, and collect wall time and results in one JSON.

    python benchmarks/run_ptq_suite.py --out DIR --name NAME -- "<args of scripts/2_eval_ptq.sh>" ...

Each entry is passed to ``bash scripts/2_eval_ptq.sh`` (so the benchmark measures the user-facing command),
with ``--result_json DIR/NAME-<i>.json`` appended. The summary (``DIR/NAME.json``) holds, per run, the exact
command, the wall time of the whole process (start-up included), the perplexity and the in-process timings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.io import write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the per-run and summary JSON files")
    parser.add_argument("--name", required=True, help="summary file stem")
    parser.add_argument("runs", nargs="+", help="argument strings for scripts/2_eval_ptq.sh, one per run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for index, run in enumerate(args.runs):
        result_path = out / f"{args.name}-{index}.json"
        command = ["bash", "scripts/2_eval_ptq.sh", *shlex.split(run), "--result_json", str(result_path)]
        print(f"[suite] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT)
        wall = time.perf_counter() - start
        entry = {"command": " ".join(command), "returncode": proc.returncode, "wall_s": round(wall, 2)}
        if proc.returncode == 0 and result_path.is_file():
            result = json.loads(result_path.read_text())
            entry.update(wiki2_ppl=result["wiki2_ppl"], timings=result["timings"], device=result["device"]["name"])
            entry["peak_gpu_memory_gib"] = result.get("peak_gpu_memory_gib")
        print(f"[suite] -> {entry.get('wiki2_ppl')} in {wall:.1f} s", flush=True)
        summary.append(entry)
        write_json(out / f"{args.name}.json", summary)
    return 0 if all(e["returncode"] == 0 for e in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
