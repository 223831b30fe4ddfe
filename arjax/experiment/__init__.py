"""What every experiment module shares, by job.

- `base`: the config fields all experiments have (data, sampling grid, mesh, seed).
- `pipeline`: training stages, stage/sampling checks and cached code extraction.
- `outputs`: training summaries, digits scoring and the sample reports (`samples/<tag>/`).
- `cli`: the command line: `--config/--set/--workdir/--tag`, the work-dir lock and one-line
  errors for expected failures.
"""
