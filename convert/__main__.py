"""Command line: `python -m convert hf2ms|ms2hf|reshard|merge ...` (see --help of each)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from telechat2_ms.formats.dtypes import DTYPE_CHOICES
from convert.hf_to_ms import hf_to_ms
from convert.ms_to_hf import ms_to_hf
from convert.reshard import merge, reshard
from telechat2_ms.cli import ArgumentParser, add_debug_flag, report_errors


def _layer_counts(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer-counts wants comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m convert", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace an existing output")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(common)

    p = sub.add_parser("hf2ms", parents=[common], help="HF directory -> MindSpore checkpoint")
    p.add_argument("hf_dir", help="HF TeleChat2 / Qwen2 directory (config.json + safetensors shards or pytorch_model*.bin)")
    p.add_argument("output", help="output file: NAME.safetensors (streamed) or NAME.ckpt (built in memory)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep", help="output dtype (default: keep)")
    p.add_argument("--fused-qkv", action="store_true",
                   help="write inference layouts w_qkv=[wq;K;V] and w_gate_hidden=[w1;w3]")
    p.add_argument("--gmm", action="store_true",
                   help="mixture of experts: stacked expert weights in MindFormers' grouped-matmul layout [E, in, out] "
                        "(what its convert_gmm step writes; the file's metadata marks it)")

    p = sub.add_parser("ms2hf", parents=[common], help="MindSpore checkpoint -> HF directory")
    p.add_argument("ms_checkpoint", help=".safetensors, .ckpt, or a sharded layout directory")
    p.add_argument("output", help="output HF directory (config.json, index, shards)")
    p.add_argument("--config", help="size name (e.g. telechat2_7b) or config.json; needed when the checkpoint "
                                    "carries no config")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep", help="output dtype (default: keep)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB or 2GiB (default 5GB)")
    p.add_argument("--gmm", action="store_true",
                   help="the stacked expert weights are in MindFormers' grouped-matmul layout [E, in, out] (found "
                        "from the metadata of a file hf2ms --gmm wrote; needed for a MindFormers convert_gmm file)")

    p = sub.add_parser("reshard", parents=[common], help="full checkpoint or layout -> (tp, pp) layout")
    p.add_argument("src", help="full .safetensors/.ckpt checkpoint, a layout directory, or an HF directory "
                               "(converted as hf2ms would, tensor by tensor: HF weights to a layout in one command)")
    p.add_argument("output", help="output layout directory, or NAME.safetensors for the full checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--layer-counts", type=_layer_counts, default=None, help="layers per stage, e.g. 13,11")
    p.add_argument("--config", help="size name or config.json when the source carries no config")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep", help="output dtype (default: keep)")

    p = sub.add_parser("merge", parents=[common], help="layout directory -> one full .safetensors")
    p.add_argument("src", help="layout directory (with layout.json)")
    p.add_argument("output", help="NAME.safetensors")
    p.add_argument("--file", default="model.safetensors",
                   help="which per-rank file to merge: model.safetensors (the weights, default), or "
                        "exp_avg.safetensors / exp_avg_sq.safetensors of a checkpoint written by training under "
                        "msrun (AdamW's moments, under the parameters' names)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    progress = not args.no_progress
    if args.command == "hf2ms":
        out = hf_to_ms(args.hf_dir, args.output, args.dtype, args.fused_qkv, args.overwrite, progress, args.gmm)
    elif args.command == "ms2hf":
        out = ms_to_hf(args.ms_checkpoint, args.output, args.config, args.dtype, args.shard_size,
                       args.overwrite, progress, args.gmm)
    elif args.command == "reshard":
        out = reshard(args.src, args.output, args.tp, args.pp, args.layer_counts, args.config, args.dtype,
                      args.overwrite, progress)
    else:
        out = merge(args.src, args.output, args.overwrite, progress, args.file)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
