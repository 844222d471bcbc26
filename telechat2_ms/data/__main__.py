"""Preprocess training data once, before a (multi-process) run:

    python -m telechat2_ms.data --input data/sft --output data/sft_4096 --seq_length 4096 \
        [--format sft|pretrain] [--tokenizer PATH] [--truncation error|truncate|drop] [--seed 1234]

--input takes what `train.train_dataset` takes (jsonl files, a directory, a data-mix .json, a MindFormers
.mindrecord file, comma-separated); the output directory can then be given as `train.train_dataset`. An
--output ending in .mindrecord writes MindFormers' layout instead (input_ids and labels rows of seq_length
tokens, data/mindrecord.py; MindFormers reads rows of its seq_length + 1). Prints the dataset summary.
"""
from __future__ import annotations

import os
import sys

from telechat2_ms.data.dataset import build_dataset
from telechat2_ms.data.sft import TRUNCATION_POLICIES
from telechat2_ms.cli import ArgumentParser, add_debug_flag, report_errors
from telechat2_ms.data.sources import resolve_sources


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m telechat2_ms.data", description=__doc__.split("\n")[0],
                            allow_abbrev=False)
    parser.add_argument("--input", required=True, help="jsonl file(s), a directory of jsonl, or a data-mix .json")
    parser.add_argument("--output", required=True, help="new dataset directory (must not exist), or NAME.mindrecord "
                                                        "for a MindFormers MindRecord file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing .mindrecord output")
    parser.add_argument("--seq_length", type=int, required=True, help="training sequence length")
    parser.add_argument("--format", default="sft", choices=("sft", "pretrain"), help="data format (default sft)")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model or its directory (default: demo tokenizer)")
    parser.add_argument("--truncation", default="error", choices=TRUNCATION_POLICIES,
                        help="SFT samples longer than seq_length: error (default), truncate or drop")
    parser.add_argument("--seed", type=int, default=1234, help="data-mix resampling seed (train.seed)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return report_errors(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    from telechat2_ms.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or None)
    if args.output.endswith(".mindrecord"):
        import tempfile

        from telechat2_ms.data.mindrecord import check_mindrecord_output, write_mindrecord

        check_mindrecord_output(args.output, args.overwrite)  # before any tokenizing
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output))) as scratch:
            dataset = build_dataset(resolve_sources(args.input), os.path.join(scratch, "dataset"), tokenizer,
                                    args.seq_length, args.format, args.truncation, args.seed)
            rows = write_mindrecord(dataset, args.output, args.overwrite)
            print(f"wrote {args.output}: {rows} rows of {args.seq_length} tokens (input_ids, labels), "
                  f"{dataset.index['num_tokens']} tokens, {dataset.index['num_target_tokens']} targets")
        return 0
    _summary(build_dataset(resolve_sources(args.input), args.output, tokenizer, args.seq_length, args.format,
                           args.truncation, args.seed))
    return 0


def _summary(dataset) -> None:
    index = dataset.index
    print(f"{dataset}: {index['num_tokens']} tokens, {index['num_target_tokens']} targets")
    if index.get("sft", {}).get("records"):
        sft = index["sft"]
        print(f"  {sft['records']} records ({sft['packed_dialogs']} packed single-turn), "
              f"{sft['num_truncated']} truncated, {sft['num_dropped']} dropped")


if __name__ == "__main__":
    sys.exit(main())
