"""The `serve` run mode: an OpenAI-compatible HTTP server (serving/api.py) over continuous batching
(serving/engine.py) on the model the build layer made for this rank.

Under msrun with tensor parallel, rank 0 serves HTTP and runs the scheduler; every other rank follows the
model calls rank 0 broadcasts (engine.follow), so all ranks step the same batch.
"""
from __future__ import annotations

import sys

from telechat2_ms.settings import RunSettings


def served_name(settings: RunSettings, config) -> str:
    return settings.serve.served_model_name or config.name


def make_server(settings: RunSettings, run):
    """(Server, Scheduler) for a built run (build.build_run); the scheduler is not started."""
    from telechat2_ms.serving.api import Server
    from telechat2_ms.serving.engine import Runner, Scheduler

    s = settings.serve
    runner = Runner(run.model, s.max_batch, settings.seq_length, settings.jit, s.key_window,
                    prefill_bucket=s.prefill_bucket)
    broadcast = None
    if run.world > 1:
        from telechat2_ms.parallel.ranks import broadcast_object

        broadcast = broadcast_object
    scheduler = Scheduler(runner, run.tokenizer, s.queue_size, s.prefill_tokens, broadcast)
    server = Server(scheduler, run.tokenizer, served_name(settings, run.model.config), settings.generate,
                    settings.system_prompt)
    return server, scheduler


def run_serve(settings: RunSettings, plan=None, ready=None) -> None:
    import uvicorn

    from telechat2_ms.build import build_run, plan_run
    from telechat2_ms.parallel import comm
    from telechat2_ms.serving.api import create_app
    from telechat2_ms.serving.engine import follow

    run = build_run(plan or plan_run(settings, comm.get_world_size()))
    server, scheduler = make_server(settings, run)
    if settings.serve.warm_up:
        scheduler.runner.warm_up((lambda text: print(text, file=sys.stderr, flush=True)) if run.is_main else None)
    if not run.is_main:
        from telechat2_ms.parallel.ranks import broadcast_object

        follow(scheduler.runner, lambda: broadcast_object(None))
        return
    scheduler.start()
    s = settings.serve
    print(f"serving {server.served_model} on http://{s.host}:{s.port}/v1 (max_batch {s.max_batch}, context "
          f"{settings.seq_length} tokens)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=s.host, port=s.port, log_level=s.log_level)
    finally:
        scheduler.stop()
