"""The one entry point: `python run_telechat2.py --config X.yaml --run_mode MODE [--section.key=value ...]`.

Run directly for one device, or under `msrun` for several (parallel degrees come from `parallel_config`, and
their product must equal msrun's worker count; only rank 0 prints, see telechat2_ms/parallel/session.py).
Modes: predict (generate for `predict_data`), chat (interactive), finetune (SFT jsonl), train (pretraining
jsonl), eval (C-Eval / MMLU). Without --config the built-in tiny model runs on CPU with no downloads.
"""
from __future__ import annotations

import argparse
import sys

from telechat2_ms.config import ConfigError


def _predict(settings):
    from telechat2_ms.predict import run_predict
    return run_predict(settings)


def _chat(settings):
    from telechat2_ms.predict import run_chat
    return run_chat(settings)


def _train(settings):
    from telechat2_ms.parallel import comm
    if comm.get_world_size() > 1:  # under msrun: the trainer's loop around the explicit parallel step
        from telechat2_ms.parallel.training import run_parallel_train
        return run_parallel_train(settings)
    from telechat2_ms.train import run_train
    return run_train(settings)


def _eval(settings):
    from telechat2_ms.evaluate import run_eval
    from telechat2_ms.parallel.session import build_run
    run = build_run(settings, "eval")
    return run_eval(settings, run.model, run.tokenizer)


RUN_MODES = {"predict": _predict, "chat": _chat, "finetune": _train, "train": _train, "eval": _eval}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="TeleChat2 on MindSpore: predict, chat, finetune, train (pretraining) or eval (C-Eval/MMLU).",
        epilog="Any setting of the YAML can be overridden as --key=value or --section.key=value, e.g. "
               "--generate.max_new_tokens=64 --parallel_config.model_parallel=2 --predict_data='[\"hi\"]'.")
    parser.add_argument("--config", default=None, help="YAML run settings (configs/<size>/<task>.yaml); "
                        "default: built-in tiny model, CPU, random weights")
    parser.add_argument("--run_mode", default=None, choices=sorted(RUN_MODES),
                        help="what to run (overrides the YAML's run_mode; default predict)")
    parser.add_argument("--load_checkpoint", default=None, help="MindSpore checkpoint file or directory to load")
    parser.add_argument("--predict_data", nargs="+", default=None, help="prompt text(s) for predict")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognised argument(s) {bad}; overrides must look like --section.key=value")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from telechat2_ms.parallel.session import start as start_parallel
    from telechat2_ms.runtime import check_run_mode, setup_device
    from telechat2_ms.settings import load_settings

    try:
        settings = load_settings(args.config, overrides)
        if args.run_mode:
            settings.run_mode = args.run_mode
        if args.load_checkpoint is not None:
            settings.load_checkpoint = args.load_checkpoint
        if args.predict_data is not None:
            settings.predict_data = list(args.predict_data)
        check_run_mode(settings.run_mode)
        setup_device(settings)
        start_parallel(settings)  # under msrun: communication.init(), checks parallel_config vs world size
        RUN_MODES[settings.run_mode](settings)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
