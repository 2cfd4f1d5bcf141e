"""Run by tests/test_distributed.py, with or without torchrun: one fine-tuning step, then save gradients.

usage: distributed_worker.py MODE PRIOR_DIR Y_PATH RUN_DIR OUT   (MODE: per-measurement | amortised | backprop)
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from deftcli.distributed import setup, teardown
from deftcli.finetune import Finetuner
from deftcli.images import output_folder
from deftcli.runs import resolve_run_dir
from deftcli.specs import FinetuneSpec

torch.set_num_threads(1)
mode, prior_dir, y_path, run_dir, out = sys.argv[1:6]
spec = FinetuneSpec.model_validate(
    {
        "prior": {"path": prior_dir},
        "operator": {"name": "superres", "params": {"factor": 2, "sigma": 0.1}},
        "measurement": None if mode == "amortised" else y_path,
        "method": "backprop" if mode == "backprop" else "vargrad",
        "iterations": 5,
        "time_steps": 8,
        "trajectories": 4,
        "measurements_per_batch": 2,
        "grad_clip": 1e9,
        "grad_fraction": 0.3,
        "micro_batch": 1,
        "hnet": {"model_channels": 8, "channel_mult": [1], "time_embedding_dim": 16, "time_hidden": 16},
        "run_dir": run_dir,
        "device": "cpu",
    }
)
ctx = setup(torch.device("cpu"))
if ctx.is_main:
    output_folder(resolve_run_dir(spec, resume=False))
ctx.barrier()
trainer = Finetuner(spec, Path(run_dir), resume=False, quiet=True, ctx=ctx)
record, _, _ = trainer.step()
if ctx.is_main:
    grads = {name: p.grad.detach().clone() for name, p in trainer.htransform.named_parameters()}
    save_file({**grads, "loss": torch.tensor([record["loss"]])}, out)
teardown(ctx)
