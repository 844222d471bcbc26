"""The one entry point: `python run_telechat2.py --config X.yaml --run_mode MODE [--section.key=value ...]`.

Run directly for one device, or under `msrun` for several (parallel degrees come from `parallel_config`, and
their product must equal msrun's worker count; only rank 0 prints). Every run goes settings -> one validation
(telechat2_ms/settings.validate, via build.plan_run) -> build (telechat2_ms/build.py) -> the run mode;
`--dry_run` stops after the validation and prints the plan (telechat2_ms/dry_run.py).
Modes: predict (generate for `predict_data`), chat (interactive), finetune (SFT jsonl), train (pretraining
jsonl), eval (C-Eval / MMLU), serve (an OpenAI-compatible HTTP server, telechat2_ms/serving). Without --config the built-in tiny model runs on CPU with no downloads.
"""
from __future__ import annotations

import sys

from telechat2_ms.config import ConfigError


def _predict(settings, plan):
    from telechat2_ms.predict import run_predict
    return run_predict(settings, plan=plan)


def _chat(settings, plan):
    from telechat2_ms.predict import run_chat
    return run_chat(settings, plan=plan)


def _train(settings, plan):
    from telechat2_ms.train import run_train
    return run_train(settings, plan=plan)


def _eval(settings, plan):
    from telechat2_ms.build import build_run
    from telechat2_ms.evaluate import run_eval
    from telechat2_ms.checkpoint import fingerprint
    run = build_run(plan)
    return run_eval(settings, run.model, run.tokenizer, weights=fingerprint(plan.ref, settings.train.seed))


def _serve(settings, plan):
    from telechat2_ms.serving import run_serve
    return run_serve(settings, plan=plan)


RUN_MODES = {"predict": _predict, "chat": _chat, "finetune": _train, "train": _train, "eval": _eval,
             "serve": _serve}


def build_parser():
    """--config, --dry_run, --world_size, --debug, and every settings key as --key value / --key=value."""
    from telechat2_ms.cli import ArgumentParser, add_debug_flag
    from telechat2_ms.settings import settings_keys

    parser = ArgumentParser(
        usage="%(prog)s [--config YAML] [--dry_run [--world_size N]] [--debug] [--KEY VALUE | --KEY=VALUE ...]",
        description="TeleChat2 on MindSpore: predict, chat, finetune, train (pretraining), eval (C-Eval/MMLU) or "
                    "serve (OpenAI-compatible HTTP API).",
        epilog="Every setting of the YAML can be given as --key value or --key=value (--section.key for a "
               "section's), e.g. --generate.max_new_tokens 64 --parallel_config.model_parallel=2; a bare "
               "boolean key means true.", allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML run settings (configs/<size>/<task>.yaml); "
                        "default: built-in tiny model, CPU, random weights")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate the settings, print the layout, per-rank shapes and the cost model's memory "
                             "and step-time prediction, build nothing, exit")
    parser.add_argument("--world_size", type=int, default=None,
                        help="with --dry_run outside msrun: the number of processes to check the layout for "
                             "(default 1; under msrun the real world size)")
    add_debug_flag(parser)
    group = parser.add_argument_group("settings (override the YAML)")
    for dotted, f in settings_keys().items():
        doc = f.metadata.get("doc", "")
        options = {"dest": dotted, "default": None, "help": doc.replace("%", "%%")}
        if "choices" in f.metadata:
            options["choices"] = list(f.metadata["choices"])
        elif f.type is bool:
            options.update(nargs="?", const="true", metavar="true|false")
        elif dotted == "predict_data":
            options.update(nargs="+", metavar="PROMPT")
        else:
            options["metavar"] = dotted.rsplit(".", 1)[-1].upper()
        group.add_argument(f"--{dotted}", **options)
    return parser


def parse_args(argv):
    """-> (the tool's own options, {dotted settings key: value as given})."""
    from telechat2_ms.settings import settings_keys

    args = build_parser().parse_args(argv)
    given = {dotted: getattr(args, dotted) for dotted in settings_keys() if getattr(args, dotted) is not None}
    return args, given


def main(argv=None) -> int:
    from telechat2_ms.cli import report_errors

    args, given = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: _main(args, given), debug=args.debug)


def _main(args, given) -> int:
    from telechat2_ms.build import plan_run, setup_device
    from telechat2_ms.parallel import comm
    from telechat2_ms.settings import check_enumerations, load_settings

    settings = load_settings(args.config, [given])
    if args.world_size is not None and (not args.dry_run or comm.launched_by_msrun()):
        raise ConfigError("--world_size is for --dry_run without msrun (under msrun the world is msrun's)")
    check_enumerations(settings)  # run mode, device, dtype: what the device set-up needs
    if args.dry_run and not comm.launched_by_msrun():
        world = 1 if args.world_size is None else args.world_size
        if world < 1:
            raise ConfigError(f"--world_size must be at least 1, got {world}")
    else:
        setup_device(settings)
        _, world = comm.init_distributed()  # under msrun: communication.init()
    plan = plan_run(settings, world)  # the one validation, before any model or data work
    if args.dry_run:
        from telechat2_ms.dry_run import report
        if comm.get_rank() == 0:
            print(report(plan))
        return 0
    RUN_MODES[settings.run_mode](settings, plan)
    return 0


if __name__ == "__main__":
    # progress lines reach msrun's worker logs (a file, so block-buffered by default) as they are printed, and
    # survive a kill of the job
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())
