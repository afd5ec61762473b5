"""Peak host memory (RSS) of each rank while FSDP2 loads a model: every rank reading the whole model, against
rank 0 reading it and broadcasting the shards (``phi3v.train.engine.shard_fsdp2``, what ``phi3v train`` does).

    python benchmarks/fsdp_rss.py [--nproc 2] [--saved-dtype bf16] [--out benchmarks/fsdp-rss.json]

It saves a random model of 329 MiB in float32 (the tiny preset's structure with a 16,384-token vocabulary, hidden
size 1,024 and 4 decoder layers) in the official format to a temporary folder, in bfloat16 like the released
weights unless ``--saved-dtype fp32``; every rank loads it as float32 master weights, as full fine-tuning does.
Then it starts ``torchrun
--standalone`` (gloo, CPU) once per mode. Each rank reports its peak RSS (``ru_maxrss``) after the imports and
after loading and sharding, and its bytes of parameter shards.

Modes:

* ``whole``: every rank ``from_pretrained`` the whole model, then the same ``fully_shard`` units (the loading path
  before rank-0 loading: Accelerate's prepare sharded a model every process had loaded);
* ``rank0``: rank 0 ``from_pretrained``; the others build the model on the meta device; ``shard_fsdp2`` shards
  it and broadcasts rank 0's weights into every rank's shards.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SIZE = {"vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
        "num_attention_heads": 16, "num_key_value_heads": 16}  # fmt: skip


def _config():
    from phi3v.model import Phi3VConfig
    from phi3v.model.presets import TINY

    data = copy.deepcopy(TINY)
    data.update(SIZE)
    half_head = SIZE["hidden_size"] // SIZE["num_attention_heads"] // 2
    data["rope_scaling"] = {"type": "su", "short_factor": [1.0] * half_head, "long_factor": [2.0] * half_head}
    return Phi3VConfig.from_official_dict(data)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(mode: str, folder: str, out: str) -> None:
    """One rank: load in ``mode``, shard, report (rank 0 writes every rank's numbers to ``out``)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from phi3v.model import Phi3VConfig, Phi3VForCausalLM, build_model
    from phi3v.train.engine import mixed_precision_policy, shard_fsdp2

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    after_imports = _peak_mib()
    if mode == "whole":
        model = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.float32)
        policy = mixed_precision_policy("fp32")
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model.model.vision_embed_tokens.img_processor, mp_policy=policy)
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    else:
        if rank == 0:
            model = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            model = build_model(Phi3VConfig.from_pretrained(folder), dtype=torch.float32, device="meta", seed=None)
        model = shard_fsdp2(model, "fp32", torch.device("cpu"))
    import gc

    gc.collect()
    report = {"rank": rank, "peak_rss_after_imports_mib": round(after_imports, 1),
              "peak_rss_mib": round(_peak_mib(), 1),
              "local_param_mib": round(sum(p.to_local().numel() * p.element_size()
                                           for p in model.parameters()) / 2**20, 1)}  # fmt: skip
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as json here too")
    parser.add_argument("--saved-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype of the saved checkpoint (default bf16, as the released weights); it is loaded as "
                             "fp32 master weights either way")  # fmt: skip
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from phi3v.model import build_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(_config(), dtype=torch.float32, seed=0)
        size = sum(p.numel() * p.element_size() for p in model.parameters())  # fp32, as every mode loads it
        model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[args.saved_dtype]).save_pretrained(tmp)
        del model
        results["param_mib"] = round(size / 2**20, 1)
        results["saved_dtype"] = args.saved_dtype
        for mode in ("whole", "rank0"):
            out = Path(tmp) / f"{mode}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                       __file__, "--worker", mode, tmp, str(out)]  # fmt: skip
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[mode] = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
