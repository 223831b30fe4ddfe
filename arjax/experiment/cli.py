"""The experiments' command line, the work-dir lock and one-line errors for expected failures.

    python -m experiments.<name> --config PRESET [--set key=value ...] [--workdir DIR]
                                 [--tag NAME]

Expected failures (`arjax.errors.UserError`: bad config, missing data, unusable checkpoint)
print one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from arjax import compilation_cache, distributed
from arjax import config as cfglib
from arjax.errors import UserError
from arjax.experiment.outputs import report


@contextlib.contextmanager
def workdir_lock(workdir: str | None):
    """Holds `<workdir>/.lock` for the run: a second run on the same work dir fails at once
    with a clear message instead of racing the first one's checkpoints. Process 0 holds it
    for a multi-process run."""
    if workdir is None or not distributed.is_main():
        yield
        return
    cfglib.check(not os.path.exists(workdir) or os.path.isdir(workdir),
                 f"--workdir {workdir!r} is a file; pass a directory")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            raise cfglib.ConfigError(
                f"work dir {workdir!r} is in use by another run (pid {owner}); wait for it to "
                "finish or pass another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_experiment(build, cfg, workdir: str | None, progress: bool = True,
                   tag: str | None = None) -> dict:
    """`build(cfg, workdir, progress)` (train, resume or load every stage) under the work-dir
    lock, then `outputs.report` into a new `<workdir>/samples/<tag>/`."""
    with workdir_lock(workdir):
        built = build(cfg, workdir, progress)  # may hold more (the models) for other callers
        return report(built["generate"], built["params"], cfg, workdir, built["summary"],
                      built["step"], built.get("score"), tag)


def exit_on_user_error(main: Callable[[], object]) -> object:
    """Runs `main()`; a `UserError` becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli(presets, run, argv: Sequence[str], doc: str, name: str) -> None:
    """`python -m experiments.<name> ...`: parses, runs `run(cfg, workdir, tag=...)` and prints
    the summary. `distributed.initialize(--distributed)` runs first, before any device is
    touched, and the persistent compilation cache is on (`arjax.compilation_cache`)."""
    def main():
        cfg, args = cfglib.from_argv(presets, argv, doc)
        distributed.initialize(args.distributed)
        compilation_cache.enable()
        workdir = args.workdir or f"runs/{name}_{args.config}"
        summary = run(cfg, workdir, tag=args.tag)
        if not distributed.is_main():
            return
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, np.ndarray)},
                         indent=1, default=str))
        print(f"samples: {summary['report_dir']}/samples.png (one row per class)")
    exit_on_user_error(main)
