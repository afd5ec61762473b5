"""The ``phi3v`` command."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from phi3v.demo import DemoSettings, run_demo

    run_demo(args.out, DemoSettings.quick() if args.quick else DemoSettings())
    return 0


def _component_counts(model) -> dict[str, int]:
    vision = model.model.vision_embed_tokens
    counts = {
        "vision_tower": sum(p.numel() for p in vision.img_processor.parameters()),
        "projector": sum(p.numel() for p in vision.img_projection.parameters())
        + vision.glb_GN.numel()
        + vision.sub_GN.numel(),
    }
    counts["language_model"] = sum(p.numel() for p in model.parameters()) - counts["vision_tower"] - counts["projector"]
    counts["total"] = sum(counts.values())
    return counts


def _cmd_model_init(args: argparse.Namespace) -> int:
    import torch

    from phi3v.model import Phi3VForCausalLM, build_model

    dtype = getattr(torch, args.dtype)
    model = build_model(args.preset, dtype=dtype, seed=args.seed)
    model.save_pretrained(args.out)
    total = _component_counts(model)["total"]
    print(f"wrote a randomly initialised '{args.preset}' model to {args.out} ({total:,} parameters)")
    if args.no_verify:
        return 0
    reloaded = Phi3VForCausalLM.from_pretrained(args.out)  # holds a second copy: --no-verify for full-size presets
    pairs = zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"reloaded it with Phi3VForCausalLM.from_pretrained: weights {'identical' if same else 'DIFFER'}")
    return 0 if same else 1


def _cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from phi3v.model import Phi3VForCausalLM, build_model

    if args.preset:
        model = build_model(args.preset, device="meta")
    else:
        model = Phi3VForCausalLM.from_pretrained(args.path, device_map="cpu")
    state = model.state_dict()
    info = {
        "parameters": _component_counts(model),
        "state_dict_keys": len(state),
        "vision_layers_built": model.config.vision_layers_used,
        "crop_size": model.config.crop_size,
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    if args.keys:
        info["keys"] = {k: list(v.shape) for k, v in state.items()}
    json.dump(info, sys.stdout, indent=2)
    print()
    del torch
    return 0


def _check_processor(args: argparse.Namespace):
    from phi3v.processing import Phi3VImageProcessor, Phi3VProcessor, build_tiny_tokenizer

    if args.model:
        return Phi3VProcessor.from_pretrained(args.model, num_crops=args.num_crops), ""
    if args.preset == "tiny":
        return Phi3VProcessor.tiny(num_crops=args.num_crops), ""
    # Official image geometry; text tokens counted with the small tokenizer (one token per character, roughly).
    image_processor = Phi3VImageProcessor(num_crops=args.num_crops)
    note = " (text counted with phi3v's small tokenizer; pass --model for the exact count)"
    return Phi3VProcessor(image_processor, build_tiny_tokenizer(), image_token_id=32044), note


def _cmd_data_check(args: argparse.Namespace) -> int:
    from phi3v.data.check import check_file

    processor, note = _check_processor(args)
    report = check_file(args.data, args.image_root, processor, max_length=args.max_length, workers=args.workers,
                        on_overflow=args.on_overflow, system=args.system)  # fmt: skip
    report.tokenizer_note = note
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from phi3v.data.convert import check_written, options, run

    if args.src is None and args.source != "digits":
        raise ValueError(f"phi3v convert {args.source} needs --src")
    kwargs = {name: getattr(args, name) for name in options(args.source) if hasattr(args, name)}
    written = run(args.source, args.out, name=args.name, **kwargs)
    if args.no_check:
        return 0
    return 0 if check_written(written, args.out, args.num_crops) else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from phi3v.train.config import load_config
    from phi3v.train.loop import train

    config = load_config(args.config, args.overrides)
    summary = train(config)
    if "final" in summary:
        print(f"trained {summary['steps']} steps; final loss {summary['losses'][-1]:.4f}; saved to {summary['final']}")
    return 0


def _model_and_processor(args: argparse.Namespace):
    from phi3v.eval.inference import load_for_inference

    return load_for_inference(args.model, args.adapter, dtype=args.dtype, device=args.device,
                              num_crops=args.num_crops, force=args.force)  # fmt: skip


def _init_distributed(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group and take this rank's GPU, so evaluation is spread over ranks."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda and args.device is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from phi3v.data.dataset import JsonlDataset, apply_length_policy
    from phi3v.eval.evaluate import evaluate, write_evaluation
    from phi3v.tasks import get_task

    if args.on_overflow is not None and args.max_length is None:
        raise ValueError(f"--on-overflow {args.on_overflow} needs --max-length N (the length it applies to)")
    _init_distributed(args)
    model, processor = _model_and_processor(args)
    task = get_task(args.task)
    labels = None
    if args.label_set:
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else list(task.labels or [])
        if not labels:
            raise ValueError(f"task {task.name} has no label set; pass --labels a,b,c")
    dataset = JsonlDataset(args.data, args.image_root, system=args.system)
    samples = None
    if args.max_length is not None:  # checked before any generation: every image decoded, every length counted
        samples = apply_length_policy(dataset, processor, args.max_length, args.on_overflow or "error")
    result = evaluate(model, processor, dataset, task, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_samples=args.max_samples, labels=labels)  # fmt: skip
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        written = write_evaluation(result, args.out, labels, samples)
        print(json.dumps(result.metrics, indent=2))
        if samples is not None:
            print(f"evaluated {len(result.predictions)} sample(s); longer than max_length {samples['max_length']} "
                  f"(on_overflow: {samples['on_overflow']}): {samples['dropped']} dropped, {samples['truncated']} "
                  "truncated (evaluated with the whole prompt)")  # fmt: skip
        print("wrote " + ", ".join(str(p) for p in written))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from phi3v.eval.generate import generate
    from phi3v.processing import load_image

    model, processor = _model_and_processor(args)
    images = [load_image(path) for path in args.image]
    answer = generate(model, processor, args.question, images, args.max_new_tokens, stream=not args.no_stream,
                      system=args.system)  # fmt: skip
    if args.no_stream:
        print(answer)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from phi3v.export import export

    dtype = getattr(torch, args.dtype) if args.dtype else None
    manifest = export(args.model, args.adapter, args.out, dtype=dtype, frames=args.frames, force=args.force)
    parity = manifest["parity"]
    print(f"exported to {args.out}: merged logits match base + adapter within {parity['max_abs_logit_difference']:.2g}"
          f" (tolerance {parity['tolerance']})")  # fmt: skip
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from phi3v.report import write_report

    print(f"wrote {write_report(args.run_dirs, args.out, args.eval, args.gallery)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from phi3v.serve import ServeConfig

    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapter {item!r}: the name {name!r} is given twice")
        adapters[name] = directory
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "model_name",
            "host",
            "port",
            "api_key",
            "allow_local_files",
            "num_crops",
            "dtype",
            "device",
            "max_batch_size",
            "max_body_bytes",
            "max_image_bytes",
            "max_images",
            "max_prompt_tokens",
            "max_tokens",
        )
    }
    config = ServeConfig(adapters=adapters, default_max_tokens=min(256, args.max_tokens), **settings)
    try:
        from phi3v.serve.app import serve
    except ImportError as err:
        raise ValueError(f"phi3v serve needs the serve extra ({err}): pip install 'phi3v[serve]'") from err
    serve(config)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from phi3v.bench import run_bench, table, write_results

    settings = [False, True] if args.compare else [args.reference]
    results = []
    for reference in settings:
        results.append(
            run_bench(
                args.preset,
                args.strategy,
                args.batch_size,
                args.steps,
                args.warmup,
                args.tokens,
                args.num_crops,
                reference,
                args.packing,
                args.peak_tflops,
                args.device,
                compile=args.compile and not reference,
            )
        )
    print(table(results))
    if args.compare:
        print(f"phi3v / reference: {results[0].samples_per_s / results[1].samples_per_s:.2f}x samples/s")
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _system_text(text: str) -> str:
    """An argparse type: a system message, a non-empty string."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty system message, got {text!r}")
    return text


def _inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (official format) or hub id")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory (from phi3v train)")
    parser.add_argument("--num-crops", type=int, default=None, help="override the processor's num_crops")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--force", action="store_true", help="apply an adapter to a base other than its recorded one")


def build_parser() -> argparse.ArgumentParser:
    from phi3v import PRESETS, __version__

    parser = argparse.ArgumentParser(prog="phi3v", description="Fine-tune Phi-3.5-vision / Phi-3-vision natively.")
    parser.add_argument("--version", action="version", version=f"phi3v {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole recipe on scikit-learn's digits with the tiny model, on a CPU")
    demo.add_argument("--out", default="runs/demo", help="where everything is written (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a reduced run (fewer scans and epochs)")
    demo.set_defaults(func=_cmd_demo)

    model = sub.add_parser("model", help="build, save and inspect models").add_subparsers(dest="action", required=True)
    init = model.add_parser("init", help="build a preset with random weights and save it in the official format")
    init.add_argument("--preset", choices=PRESETS, default="tiny")
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--no-verify", action="store_true", help="skip reloading and comparing (halves the memory)")
    init.set_defaults(func=_cmd_model_init)

    info = model.add_parser("info", help="parameter counts and state-dict keys of a preset or checkpoint")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=PRESETS)
    source.add_argument("--path", help="checkpoint directory")
    info.add_argument("--keys", action="store_true", help="also list every key and shape")
    info.set_defaults(func=_cmd_model_info)

    train = sub.add_parser("train", help="fine-tune: phi3v train CONFIG.yaml [key=value ...]")
    train.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate on a jsonl file with the task's metric")
    _inference_arguments(ev)
    ev.add_argument("--data", required=True, help="jsonl file")
    ev.add_argument("--image-root", required=True)
    ev.add_argument("--task", required=True)
    ev.add_argument("--out", default="eval", help="folder for predictions.jsonl and metrics.json")
    ev.add_argument("--batch-size", type=_positive_int, default=8)
    ev.add_argument("--max-samples", type=_positive_int, default=None)
    ev.add_argument("--label-set", action="store_true", help="score each label by log-likelihood instead of generating")
    ev.add_argument("--labels", default=None, help="comma-separated label set (default: the task's)")
    ev.add_argument("--max-length", type=_positive_int, default=None,
                    help="longest sample in tokens, as train's max_length (prompt and answer); longer ones follow "
                    "--on-overflow")  # fmt: skip
    ev.add_argument("--on-overflow", choices=["error", "truncate", "drop"], default=None,
                    help="the length policy, as train's on_overflow: error (default) stops naming file and line; "
                    "drop skips such samples; truncate evaluates one whose prompt fits with its whole prompt "
                    "(prompts are never cut). Counted in metrics.json under samples")  # fmt: skip
    ev.add_argument("--system", type=_system_text, default=None,
                    help="system message for records without their own `system` field (theirs wins)")  # fmt: skip
    ev.set_defaults(func=_cmd_eval)

    gen = sub.add_parser("generate", help="answer a question about images")
    _inference_arguments(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    gen.add_argument("--system", type=_system_text, default=None,
                     help="system message, rendered before the question as <|system|>\\n...<|end|>\\n")  # fmt: skip
    gen.add_argument("question")
    gen.set_defaults(func=_cmd_generate, max_new_tokens=256)

    exp = sub.add_parser("export", help="merge a LoRA adapter into its base, verified, in the official format")
    exp.add_argument("--model", required=True)
    exp.add_argument("--adapter", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    exp.add_argument("--frames", type=int, default=None, help="frames per video used in training (manifest)")
    exp.add_argument("--force", action="store_true", help="merge onto a base other than the adapter's recorded one")
    exp.set_defaults(func=_cmd_export)

    bench = sub.add_parser("bench", help="training throughput on DocVQA-shaped synthetic samples")
    bench.add_argument("--preset", choices=PRESETS, default="tiny")
    bench.add_argument("--strategy", choices=["full", "frozen_vision", "lora", "qlora"], default="full")
    bench.add_argument("--batch-size", type=int, default=2)
    bench.add_argument("--steps", type=int, default=5, help="timed steps")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench.add_argument("--tokens", type=int, default=2450, help="tokens per sample (about DocVQA's 2,443)")
    bench.add_argument("--num-crops", type=int, default=16)
    bench.add_argument("--packing", action="store_true", help="pack each batch into one row")
    bench.add_argument("--reference", action="store_true", help="the reference recipe's settings instead")
    bench.add_argument("--compare", action="store_true", help="phi3v's and the reference's settings, and the ratio")
    bench.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 790 for an H100)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--compile", action="store_true", help="torch.compile the decoder and CLIP layers")
    bench.add_argument("--out", default=None, help="write the results as JSON")
    bench.set_defaults(func=_cmd_bench)

    rep = sub.add_parser("report", help="self-contained HTML report of one or several training runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folders (several: compared side by side)")
    rep.add_argument("--out", default=None, help="HTML file (default RUN/report/index.html; phi3v-report.html for "
                     "several runs)")  # fmt: skip
    rep.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="DIR",
        help="an evaluation folder (phi3v eval --out) outside RUN/eval/ (one run only; repeat)",
    )
    rep.add_argument("--gallery", type=int, default=60, help="predictions shown per run (default 60)")
    rep.set_defaults(func=_cmd_report)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model and its LoRA adapters")
    srv.add_argument("--model", required=True, help="base model directory (official format)")
    srv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT adapter served under NAME (repeat for several)",
    )
    srv.add_argument("--model-name", default=None, help="the base's name in the API (default: its folder's name)")
    srv.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--allow-local-files", action="store_true", help="accept file:// image URLs")
    srv.add_argument("--num-crops", type=int, default=None, help="override the processor's num_crops")
    srv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    srv.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    srv.add_argument("--max-body-bytes", type=int, default=20_000_000)
    srv.add_argument("--max-image-bytes", type=int, default=10_000_000)
    srv.add_argument("--max-images", type=int, default=8, help="images per request")
    srv.add_argument("--max-prompt-tokens", type=int, default=16_384)
    srv.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    srv.set_defaults(func=_cmd_serve)

    data = sub.add_parser("data", help="check data files").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="report every problem of a jsonl file (file:line) and statistics")
    check.add_argument("data", help="the jsonl file")
    check.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    check.add_argument("--num-crops", type=int, default=16, help="num_crops for token counts (default 16)")
    check.add_argument("--max-length", type=_positive_int, default=None, help="count samples longer than this")
    check.add_argument("--on-overflow", choices=["error", "truncate", "drop"], default="error",
                       help="the length policy, as train's on_overflow: error (default) makes each longer sample a "
                       "problem; truncate one that cannot be cut; drop only counts them")  # fmt: skip
    check.add_argument("--model", default=None, help="checkpoint whose tokenizer counts the text tokens")
    check.add_argument("--preset", choices=["tiny"], default=None, help="count tokens for the tiny preset")
    check.add_argument("--workers", type=int, default=8, help="threads decoding images")
    check.add_argument("--system", type=_system_text, default=None,
                       help="the run's default system message (train's `system`), counted in the token lengths of "
                       "records without their own")  # fmt: skip
    check.set_defaults(func=_cmd_data_check)

    from phi3v.data.convert import SOURCES

    convert = sub.add_parser("convert", help="convert a raw dataset into the generic jsonl format")
    sources = convert.add_subparsers(dest="source", required=True)
    for name, module in SOURCES.items():
        source = sources.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        source.add_argument("--src", default=None, help="the raw dataset (file or folder)")
        source.add_argument("--out", required=True, help="output folder (images/ and NAME_{train,val,test}.jsonl)")
        source.add_argument("--name", default=None, help=f"dataset name in the file names (default {name})")
        source.add_argument("--no-check", action="store_true", help="skip `phi3v data check` of the output")
        source.add_argument("--num-crops", type=int, default=16, help="num_crops for the check's token counts")
        # The converter's own options: an option not given stays out of the kwargs, so its default is the one in
        # the converter's signature (shown in the help), never a second copy here.
        source.argument_default = argparse.SUPPRESS
        module.add_arguments(source)
        defaults = {n: p.default for n, p in inspect.signature(module.convert).parameters.items()}
        for action in source._actions:
            if defaults.get(action.dest, inspect.Parameter.empty) not in (inspect.Parameter.empty, None):
                action.help = f"{action.help or ''} (default {defaults[action.dest]})".strip()
        source.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi3v`` command."""
    from phi3v.export import ExportError
    from phi3v.train.loop import TrainingError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: phi3v's own logs say what loads
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TrainingError, ExportError) as err:  # named errors
        print(f"phi3v: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole or not at all, so one line says it all
        print("phi3v: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
