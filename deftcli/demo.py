"""``make demo``: the whole chain on the embedded default, as a user would type it.

finetune (4× super-resolution on the shipped prior) → degrade a val image → sample it → eval on a
small val subset. Every command is printed before it runs; outputs go under ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from .images import save_image
from .petals import render_petals


def run(args: list[str]) -> None:
    print(f"\n$ deft {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "deftcli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations (default: deft's default)")
    opts = parser.parse_args()
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists: remove it (make clean-demo) or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    finetune = ["finetune", "--operator", "superres", "--factor", "4", "--run-dir", str(run_dir)]
    if opts.iterations:
        finetune += ["--iterations", str(opts.iterations)]
    try:
        run(finetune)
        clean = out / "val_0003.png"
        save_image(render_petals("val", [3], 32)[0], clean)
        print(f"\nwrote a clean petals val image: {clean}")
        run(
            [
                "degrade",
                str(clean),
                "--operator",
                "superres",
                "--factor",
                "4",
                "--seed",
                "0",
                "-o",
                str(out / "low_res.png"),
            ]
        )
        run(["sample", str(out / "low_res.png"), "--run", str(run_dir), "-n", "8", "-o", str(out / "samples")])
        run(["eval", "--run", str(run_dir), "--split", "val", "--n", "16", "-k", "4", "-o", str(out / "eval")])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
    print(f"""
demo outputs:
  fine-tuning run      {run_dir}/  (preview.png, metrics.jsonl, hnet_last.safetensors)
  measurement          {out / "low_res.png"}  (from {clean})
  posterior samples    {out / "samples"}/  (sample_*.png, mean.png, std.png, summary.json)
  evaluation           {out / "eval"}/  (results.json, grid.png)
""")


if __name__ == "__main__":
    main()
