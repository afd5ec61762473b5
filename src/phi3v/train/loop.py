"""The training recipe, written out: setup, step, evaluate, save, resume.

Accelerate runs the engine (single process or DDP; DeepSpeed ZeRO-2 through its plugin; FSDP2 with the model
sharded by ``engine.shard_fsdp2``) and mixed precision; ``engine.py`` holds what differs between engines when
setting up, ``checkpoint.Checkpointer`` saves and restores the training state; everything else is here, top to
bottom.

Batches. Optimizer step ``s`` uses the samples ``perm[s*G : (s+1)*G]`` of a seeded per-epoch permutation, ``G`` the
global batch. Rank ``r``'s micro-batch ``m`` is the slice ``[(m*world + r)*B, +B)`` of it. The samples of a step
therefore do not depend on the number of processes, and resuming at step ``s`` needs no replay of the data.

Loss. Each step's loss is the mean cross-entropy over *all* supervised tokens of the global batch: the supervised
tokens of all micro-batches on all ranks are counted first, and every micro-batch's summed loss is divided by
that count (times the accumulation steps and ranks that Accelerate/DDP average over). Not a mean of means.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from phi3v.adapter_base import write_identity
from phi3v.data.dataset import JsonlDataset, apply_length_policy
from phi3v.model import Phi3VConfig, Phi3VForCausalLM, build_model, without_adapters
from phi3v.model.presets import PRESETS
from phi3v.processing import Phi3VProcessor
from phi3v.processing.chat import IGNORE_INDEX
from phi3v.processing.collate import collate
from phi3v.tasks import get_task
from phi3v.train import checkpoint as ckpt
from phi3v.train import runlog
from phi3v.train.config import TrainConfig
from phi3v.train.engine import fsdp2_layout, is_deepspeed, make_accelerator, shard_fsdp2
from phi3v.train.strategy import apply_strategy, component, parameter_counts, quantization_config
from phi3v.utils import atomic_write_text, environment

logger = logging.getLogger("phi3v")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says at which step and why."""


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for optimizer steps ``start_step .. total_steps - 1`` (see the module docstring)."""

    def __init__(self, n: int, config: TrainConfig, world: int, rank: int, start_step: int, total_steps: int):
        self.n, self.world, self.rank = n, world, rank
        self.batch, self.global_batch = config.per_device_batch_size, config.global_batch_size
        self.accumulation = config.gradient_accumulation_steps(world)
        self.seed, self.start_step, self.total_steps = config.seed, start_step, total_steps
        self.steps_per_epoch = n // self.global_batch

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        perm, epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            offset = (step % self.steps_per_epoch) * self.global_batch
            for m in range(self.accumulation):
                start = offset + (m * self.world + self.rank) * self.batch
                yield perm[start : start + self.batch]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_and_processor(
    config: TrainConfig, device: torch.device | str = "cpu", quantize: bool = True, meta: bool = False
) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    """The base model (fp32 master weights for full training; bf16/fp16 base for LoRA) and its processor.

    Args:
        config: The run's settings (``model``, ``precision``, ``attention``, ``seed``, ``num_crops``).
        device: This process's device. A spec with ``quantize_base`` (QLoRA) reads the base 4-bit straight onto it
            (bitsandbytes layers cannot be moved between GPUs afterwards).
        quantize: Read a ``quantize_base`` spec's base 4-bit (false: full precision, e.g. to save a preset base).
        meta: Build the model on the meta device, without reading or initialising any weight (FSDP2's ranks other
            than 0, which receive their shards from rank 0: ``engine.shard_fsdp2``).
    """
    base_dtype = torch.float32
    if config.spec.adapters and config.precision != "fp32":  # a frozen base needs no fp32 master weights
        base_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    quantization = quantization_config(config) if quantize else None
    if config.model == "tiny":
        model = build_model("tiny", dtype=base_dtype, attn_implementation=config.attention, seed=config.seed,
                            device="meta" if meta else (device if quantization else None),
                            quantization_config=quantization)  # fmt: skip
        return model, Phi3VProcessor.tiny(num_crops=config.num_crops)
    if config.model in PRESETS:
        raise TrainingError(
            f"model={config.model!r} is a random-weight architecture preset without a tokenizer; pass the "
            "checkpoint directory (or hub id) of the real weights"
        )
    if meta:
        model = build_model(Phi3VConfig.from_pretrained(config.model), dtype=base_dtype, device="meta",
                            attn_implementation=config.attention, seed=None)  # fmt: skip
    else:
        placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
        model = Phi3VForCausalLM.from_pretrained(
            config.model, dtype=base_dtype, attn_implementation=config.attention, **placement
        )
    return model, Phi3VProcessor.from_pretrained(config.model, num_crops=config.num_crops)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over the trainable parameters; biases, norms and separators without weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(("glb_GN", "sub_GN")) else decay).append((name, param))
    groups = [
        {"params": [p for _, p in decay], "weight_decay": config.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (LoRA has no 1-d parameters)
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    fused = torch.cuda.is_available() and all(p.is_cuda for _, p in decay + no_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, fused=fused)
    return optimizer, names


SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
"""Our ``schedule`` names -> transformers' ``get_scheduler`` names."""


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """The reference recipe's schedule, from transformers' ``get_scheduler``: the step-``s`` factor is
    ``s / warmup`` during warmup (so step 1 runs at 0), then linear (``(T - s) / (T - warmup)``) or cosine decay to
    0, or constant 1."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[config.schedule], optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)  # fmt: skip


def audit_gradients(model: torch.nn.Module, get_grad, skip_image_side: bool = False) -> None:
    """After the first backward: every trainable parameter has a finite, non-zero gradient; frozen ones none.

    The one exception is a LoRA ``A`` matrix whose ``B`` is still zero: its gradient is zero by construction.
    """
    problems = []
    params = dict(model.named_parameters())
    for name, param in params.items():
        grad = get_grad(param)
        # LoRA starts with B = 0, so A's first gradient (B^T times the output gradient) is exactly zero.
        pair = params.get(name.replace("lora_A", "lora_B")) if "lora_A" in name else None
        zero_by_init = pair is not None and not pair.detach().abs().sum() > 0
        if skip_image_side and component(name) in ("vision", "projector") and grad is None:
            continue
        if param.requires_grad:
            if grad is None:
                problems.append(f"{name}: trainable but got no gradient")
            elif not torch.isfinite(grad).all():
                problems.append(f"{name}: non-finite gradient")
            elif not zero_by_init and not grad.abs().sum() > 0:
                problems.append(f"{name}: gradient is all zeros")
        elif grad is not None:
            problems.append(f"{name}: frozen but got a gradient")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise TrainingError(f"gradient-flow audit after step 1 failed:\n  {shown}")


def train(config: TrainConfig) -> dict:
    """Run a training job; returns a summary (losses per step, final metrics, output paths)."""
    world_guess = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world_guess)
    accumulation = config.gradient_accumulation_steps(world_guess)
    dataset = JsonlDataset(config.train_data, config.image_root, max_length=config.max_length, system=config.system)
    # Text-only samples leave the image side without gradients in some steps; DDP must then look for unused
    # parameters (a little slower, so only when the data needs it).
    text_only = any(not record.image_paths for record in dataset.records)
    accelerator = make_accelerator(config, accumulation, find_unused_parameters=text_only)
    world, rank = accelerator.num_processes, accelerator.process_index
    if world != world_guess:
        raise TrainingError(f"launched with WORLD_SIZE={world_guess} but Accelerate formed {world} process(es)")
    expected = {"deepspeed_zero2": "DEEPSPEED", "fsdp2": "FSDP"}.get(config.resolved_engine)
    if expected and accelerator.distributed_type.name != expected:  # never fall back silently
        raise TrainingError(
            f"engine {config.resolved_engine} requested, Accelerate runs {accelerator.distributed_type.name}"
        )
    main = accelerator.is_main_process
    run_dir = Path(config.output_dir)
    resume_from = _resume_target(config, run_dir)  # every rank verifies the same files before anything changes
    accelerator.wait_for_everyone()
    if main:
        _claim_run_dir(config, run_dir, resume_from)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
            atomic_write_text(run_dir / "environment.json", json.dumps(environment(), indent=2) + "\n")
        except OSError as err:  # found at the time of use too: a folder may change after validation
            problem = err.strerror or err
            raise TrainingError(f"output_dir={config.output_dir!r}: cannot write there ({problem})") from err
    accelerator.wait_for_everyone()

    seed_everything(config.seed)
    fsdp2 = config.resolved_engine == "fsdp2"
    # FSDP2: rank 0 reads the weights, the others build on the meta device and receive their shards
    model, processor = load_model_and_processor(config, accelerator.device, meta=fsdp2 and not main)
    # Loaders return models in eval mode; transformers checkpoints a layer, and dropout drops, only in train mode.
    model = apply_strategy(model, config).train()
    if config.gradient_checkpointing:
        without_adapters(model).enable_activation_checkpointing(every_n_layers=config.checkpoint_every)
    if config.compile:
        compiled = without_adapters(model).compile_layers()
        if main:
            logger.info("torch.compile: %d layers", compiled)
    counts = parameter_counts(model)
    if main:
        logger.info(
            "strategy %s on %s (%s), %d process(es), %d accumulation step(s) of %d sample(s) per device",
            config.strategy, accelerator.distributed_type.name, config.resolved_engine, world, accumulation,
            config.per_device_batch_size,
        )  # fmt: skip
        for name, c in counts.items():
            logger.info("%-10s trainable %14s of %14s parameters", name, f"{c['trainable']:,}", f"{c['total']:,}")
    layout = None
    if fsdp2:
        model = shard_fsdp2(model, config.precision, accelerator.device)
        layout = fsdp2_layout(model)
        if main:
            logger.info("fsdp2: %d units (%s); parameter bytes per rank %s of %s", len(layout["units"]),
                        ", ".join(n or "<root>" for n in layout["units"]), layout["local_param_bytes"],
                        layout["param_bytes"])  # fmt: skip

    dataset.processor = processor
    dataset.uint8_pixels = config.uint8_pixels
    # Every sample checked before the first step (images decoded, lengths against the policy), the same on every
    # rank, so that no batch comes out empty and a bad file stops the run now, not an hour in.
    screened = dataset.screen(config.on_overflow, config.skip_bad_images, workers=max(1, config.num_workers))
    steps_per_epoch = len(dataset) // config.global_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{config.train_data}: {len(dataset)} samples, fewer than one global batch "
                            f"({config.global_batch_size})")  # fmt: skip
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    val, val_counts = None, None
    if config.val_data:
        # The length policy as `phi3v eval --max-length` applies it; a validation prompt is never cut.
        val = JsonlDataset(config.val_data, config.image_root, system=config.system)
        val_counts = apply_length_policy(val, processor, config.max_length, config.on_overflow,
                                         config.skip_bad_images, workers=max(1, config.num_workers))  # fmt: skip
    samples = {"dropped": screened.dropped, "truncated": screened.truncated, "bad_images": screened.bad_images,
               "duplicate_ids": screened.duplicate_ids}  # fmt: skip
    if val_counts is not None:
        samples.update(val_dropped=val_counts["dropped"], val_truncated=val_counts["truncated"],
                       val_bad_images=val_counts["bad_images"])  # fmt: skip
    task = get_task(config.task)

    optimizer, names = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    if fsdp2:
        # Sharded already. Accelerate's prepare(model, optimizer) would re-point the optimizer at the parameters by
        # data pointer, and the empty shards of small tensors (a [1, 1, E] separator on rank 1) all have pointer 0.
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    checkpointer = ckpt.Checkpointer(run_dir, accelerator, model, optimizer, scheduler, names, config.keep_last)
    state = ckpt.TrainerState(run=_run_identity(config), world_size=world)
    if resume_from is not None:
        # weights, optimizer, scheduler, loss scaler and this rank's RNG state; nothing draws from the RNGs after it
        state = checkpointer.load(resume_from, run=state.run)
        if main:
            logger.info("resumed from %s at step %d", resume_from, state.step)
            runlog.truncate_log(run_dir / "log.jsonl", state.step)
            ckpt.set_aside_newer(run_dir, state.step)

    sampler = GlobalBatchSampler(len(dataset), config, world, rank, state.step, total_steps)
    loader = DataLoader(
        dataset,
        generator=torch.Generator().manual_seed(config.seed),  # the workers' seeds: not drawn from the global RNG
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_token_id=processor.pad_token_id, pack=config.packing),
        num_workers=config.num_workers,
        persistent_workers=False,
        pin_memory=accelerator.device.type == "cuda",  # page-locked batches: the copies to the GPU run async
    )
    batches = iter(loader)
    writer = _tensorboard(run_dir, state.step) if main else None
    log_file = run_dir / "log.jsonl"
    if main and state.step == 0:
        _log(writer, log_file, {"step": 0, **samples})  # what the length and image policies removed or cut
    progress = _progress(main, state.step, total_steps)
    try:
        micro: list[dict] = []
        tick, samples_done = time.perf_counter(), 0
        for batch in batches:
            micro.append(batch)
            if len(micro) < accumulation:
                continue
            step = state.step
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            local_images = sum(0 if b["pixel_values"] is None else b["pixel_values"].shape[0] for b in micro)
            totals = torch.tensor([local_tokens, local_images], device=accelerator.device)
            global_tokens, global_images = (int(v) for v in accelerator.reduce(totals, "sum"))
            if global_tokens == 0:
                raise TrainingError(
                    f"step {step + 1}: the global batch has no supervised token (empty or cut answers?)"
                )
            divisor = global_tokens / (accumulation * world)
            step_loss = torch.zeros((), device=accelerator.device)
            for b in micro:
                inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()
                          if isinstance(v, torch.Tensor)}  # fmt: skip
                if inputs.get("pixel_values") is not None and inputs["pixel_values"].dtype == torch.uint8:
                    # sizes from the host copy: reading them from the device would wait for the copy
                    inputs["pixel_values"] = processor.image_processor.finish(inputs["pixel_values"], b["image_sizes"])
                with accelerator.accumulate(model):
                    out = model(**inputs, num_items_in_batch=divisor)
                    accelerator.backward(out.loss)
                    step_loss += out.loss.detach()
            loss = float(accelerator.reduce(step_loss, "sum")) / (accumulation * world)
            if not math.isfinite(loss):  # checked before the update, so no checkpoint ever holds its result
                raise TrainingError(f"step {step + 1}: the loss is {loss}; lower lr, or use bf16 instead of fp16")
            if step == 0 and resume_from is None:
                if is_deepspeed(accelerator):
                    logger.info("gradient audit skipped: DeepSpeed steps inside backward, its gradients are gone here")
                else:
                    # a step without images leaves the image side without gradients; only the rest can be audited
                    audit_gradients(unwrapped, lambda p: p.grad, skip_image_side=global_images == 0)
            if config.max_grad_norm:
                norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.max_grad_norm)  # fmt: skip
                if norm is not None and not math.isfinite(float(norm)) and accelerator.scaler is None:
                    raise TrainingError(f"step {step + 1}: the gradient norm is {float(norm)}")
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step + 1
            state.losses.append(loss)
            micro = []
            samples_done += config.global_batch_size
            last = state.step == total_steps
            if main and (state.step % config.log_every == 0 or last):
                rate = samples_done / (time.perf_counter() - tick)
                record = {"step": state.step, "loss": loss, "lr": lr, "samples_per_s": rate}
                _log(writer, log_file, record)
            if progress:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                progress.update(1)
            evaluate_now = val is not None and ((config.eval_every and state.step % config.eval_every == 0) or last)
            save = partial(checkpointer.save, state)  # collective (sharded engines)
            scheduled = last or (config.save_every and state.step % config.save_every == 0)
            if scheduled:
                save()  # before evaluating: a failing evaluation never costs the trained weights
            if evaluate_now:
                try:
                    improved = _evaluate(unwrapped, processor, val, task, config, state, writer, log_file, main)
                except Exception as err:
                    if not scheduled and world == 1:  # (several ranks cannot save: the others wait in evaluation)
                        save()
                    kept = ckpt.list_checkpoints(run_dir)
                    where = f"the weights of step {kept[0].name} are kept" if kept else "no checkpoint was written"
                    raise TrainingError(
                        f"step {state.step}: evaluation on {config.val_data} failed: {err}; {where} (fix the "
                        "validation data and rerun with resume=auto to continue and write final/)"
                    ) from err
                if improved:
                    save()  # (again) with the new best recorded, so that pruning keeps it
    finally:
        if progress:
            progress.close()
        if writer:
            writer.close()
    return _finish(accelerator, model, unwrapped, processor, config, run_dir, state, main, samples, layout)


def _finish(accelerator, model, unwrapped, processor, config, run_dir, state, main, samples, layout) -> dict:
    summary = {"steps": state.step, "losses": state.losses, **samples}
    if layout is not None:  # FSDP2's units and each rank's parameter bytes
        summary["fsdp2"] = layout
    final = run_dir / "final"
    # Gathering a sharded model is collective: every rank takes part, the main one writes.
    # (LoRA adapters are whole on every process, except under FSDP2, which shards them like the rest.)
    full_state = accelerator.get_state_dict(model) if accelerator.is_fsdp2 or not config.spec.adapters else None
    if main:
        _final_save(unwrapped, processor, config, final, full_state)
        summary.update(final=str(final), best=state.best, best_checkpoint=state.best_checkpoint)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _run_identity(config: TrainConfig) -> dict:
    """The settings a checkpoint is only valid for: a resume with other values is refused."""
    keys = ("model", "train_data", "strategy", "seed", "global_batch_size", "max_steps", "epochs", "lr",
            "schedule", "warmup_steps", "weight_decay", "lora_rank", "lora_alpha", "lora_targets", "vision",
            "projector", "language", "quantize_base", "precision", "num_crops", "max_length", "on_overflow",
            "skip_bad_images", "system")  # fmt: skip
    return {k: v for k, v in config.to_dict().items() if k in keys}


RUN_FILES = ("checkpoints", "log.jsonl", "summary.json", "final")
"""What a run leaves in its ``output_dir``; any of them means the folder belongs to a run."""


def _claim_run_dir(config: TrainConfig, run_dir: Path, resume_from: Path | None) -> None:
    """Make ``run_dir`` this run's, before anything is written (main process only).

    A folder holding another run is refused unless the run resumes it or ``overwrite`` is set (then the old run's
    files are deleted). ``resume=auto`` without a usable checkpoint starts afresh: the old log is emptied and any
    damaged checkpoints are set aside, so they are neither pruned as "newer" nor mixed into this run's log.
    """
    ckpt.remove_staging(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if config.overwrite:
        for name in [*found, "tensorboard"]:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if found:
            logger.warning("overwrite=true: deleted the previous run's %s in %s", ", ".join(found), run_dir)
        return
    if config.resume is None:
        if found:
            raise TrainingError(
                f"output_dir {run_dir} holds another run ({', '.join(found)}); continue it with resume=auto, "
                "choose a new output_dir, or replace it with overwrite=true"
            )
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)  # events of an attempt that logged no step
    elif resume_from is None:
        if found:
            logger.warning("resume=auto: no usable checkpoint in %s; starting from step 0", run_dir)
        runlog.truncate_log(run_dir / "log.jsonl", 0)
        ckpt.set_aside_newer(run_dir, 0)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def _resume_target(config: TrainConfig, run_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        return ckpt.find_resumable(run_dir)
    folder = Path(config.resume)
    ckpt.verify(folder)
    return folder


def _evaluate(model, processor, val, task, config, state, writer, log_file, main) -> bool:
    """Evaluate with the task's metric; True when it is the best so far (its checkpoint is then kept)."""
    from phi3v.eval.evaluate import evaluate, write_evaluation

    result = evaluate(model, processor, val, task, max_samples=config.eval_max_samples)
    value = next(iter(result.metrics.values()))  # the task's main metric comes first
    state.evaluations.append({"step": state.step, **result.metrics})
    if main:
        record = {"step": state.step, **{f"eval/{k}": v for k, v in result.metrics.items()}}
        for source, values in result.by_source.items():  # per task, when the validation file mixes several
            record.update({f"eval/{source}/{k}": v for k, v in values.items()})
        _log(writer, log_file, record)
        # the latest evaluation's predictions (each replaces the one before), for the report's gallery
        write_evaluation(result, log_file.parent / "eval" / "training", task.labels)
    if state.best is None or value > state.best:
        state.best = value
        state.best_checkpoint = str(ckpt.checkpoint_dir(config.output_dir, state.step).resolve())
        return True
    return False


def _final_save(unwrapped, processor, config, final: Path, full_state) -> None:
    if config.spec.adapters:
        # PEFT adapter (adapter_model.safetensors + adapter_config.json); the vocabulary is unchanged, so the
        # output head an lm_head adapter sits on is not copied into the adapter file
        unwrapped.save_pretrained(final, state_dict=full_state, save_embedding_layers=False)
        # PEFT records no base for phi3v: phi3v_base.json does (name + fingerprint), checked by export/eval/generate
        base_state = full_state if full_state is not None else unwrapped.state_dict()
        write_identity(final, config.model, unwrapped.get_base_model().config, base_state)
        if config.model in PRESETS:  # a random preset base exists nowhere else: keep it beside the adapter
            _save_preset_base(config, final / "base")
    else:
        unwrapped.save_pretrained(final, state_dict=full_state)
    processor.save_pretrained(final)
    logger.info("saved the %s to %s", "adapter" if config.spec.adapters else "model", final)


def _save_preset_base(config: TrainConfig, directory: Path) -> None:
    """Rebuild the run's random preset base (same seed and dtype, not quantised) and save it in the official
    format."""
    model, processor = load_model_and_processor(config, quantize=False)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _tensorboard(run_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: log.jsonl still has everything
        logger.warning("tensorboard is not installed; logging to log.jsonl only")
        return None
    # purge_step drops events a crashed run logged after its last checkpoint
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)


def _log(writer, log_file: Path, record: dict) -> None:
    runlog.append(log_file, record)
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])
        writer.flush()
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _progress(main: bool, start: int, total: int):
    if not main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["GlobalBatchSampler", "TrainingError", "audit_gradients", "component", "train"]
