"""The ``phi3v`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    print("phi3v demo: coming soon; the end-to-end demo (digits -> train -> evaluate -> report) is not built yet.")
    print("Meanwhile: `phi3v model init --preset tiny --out tiny-phi3v` builds, saves and reloads a tiny model.")
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
        model = Phi3VForCausalLM.from_pretrained(args.path, device="cpu")
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


def build_parser() -> argparse.ArgumentParser:
    from phi3v import PRESETS, __version__

    parser = argparse.ArgumentParser(prog="phi3v", description="Fine-tune Phi-3.5-vision / Phi-3-vision natively.")
    parser.add_argument("--version", action="version", version=f"phi3v {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the end-to-end demo on the embedded default data")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi3v`` command."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"phi3v: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
