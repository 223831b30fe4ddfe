"""CSpD on digits: acceptance, target passes, time and quality of continuous speculative
decoding between the digits MAR (target) and its small draft MAR, for both rules.

    python -m benchmarks.cspd_digits [--workdir runs/cspd_digits] [--per-class 20]
                                     [--num-draft 2 4 8]

Trains (or resumes) `experiments.mar_imagenet --config digits --set speculative.enabled=true`
in the work dir (KL-VAE, MAR, draft MAR), then samples 10 x `per-class` images with: the
target alone, the draft alone, and CSpD for each rule and window length (the preset's ratio),
each with the experiment's own sampler (`make_generator`: counted stats, decoder included).
Mean log R is the log acceptance ratio over drafted tokens, mean log F the log of the official
rule's trajectory factor exp(sum(Lambda_p - Lambda_q)) (reported for both rules). Class
accuracy and FID-digits from the project's digits classifier; seconds per batch are the median
and spread of 3 interleaved rounds after compilation, with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import jax


def main(argv=None) -> None:
    from arjax import config as cfglib
    from arjax import sharding
    from arjax.sampling import mar_speculative
    from arjax.sampling.generator import make_generator
    from benchmarks.digits_evaluator import score_and_time
    from experiments import mar_imagenet as exp

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/cspd_digits")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--num-draft", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    cfg = cfglib.override(exp.DIGITS, ["speculative.enabled=true", "mar_train.eval_every=0",
                                       "eval_samples_per_class=0"])
    built = exp.build(cfg, args.workdir, progress=True)
    mesh = sharding.make_mesh(cfg.mesh)
    vae, scale = built["vae"], built["latent_scale"]
    target = exp.make_sampler(built["graphdef"], *vae, mesh, cfg.sample, scale)
    draft_weights = built["draft"]
    gens = {"target alone": (target, built["params"]),
            "draft alone": (exp.make_sampler(draft_weights[0], *vae, mesh, cfg.sample, scale),
                            draft_weights[1])}
    for rule in ("exact", "official"):
        for n in args.num_draft:
            spec = dataclasses.replace(cfg.speculative, rule=rule, num_draft=n)
            gens[f"CSpD {rule}, {n} steps a window"] = (make_generator(
                lambda p, f, key, labels, s=spec: mar_speculative.sample(
                    (built["graphdef"], p), (draft_weights[0], f["draft"]), vae[0], f["vae"],
                    key, labels, cfg.sample, s, scale),
                mesh, {"vae": vae[1], "draft": draft_weights[1]}), built["params"])
    rows, times = score_and_time(gens, args.per_class)
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"{10 * args.per_class} images per setting, {cfg.sample.num_iter} MAR steps, "
          f"{cfg.sample.diffusion_steps} diffusion steps, CFG {cfg.sample.cfg}, pre-fill ratio "
          f"{cfg.speculative.ratio}")
    print("| sampler | target passes | draft passes | acceptance | mean log R | mean log F "
          "| class accuracy | FID-digits | s / batch (median) | spread | speed-up vs target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(times["target alone"])
    for name, m in rows.items():
        t = times[name]
        passes = m["target_passes"] if name != "draft alone" else 0
        drafts = m.get("draft_passes", m["target_passes"] if name == "draft alone" else 0)
        acc, log_r, log_f = (f"{m[k]:.3f}" if k in m else "-" for k in (
            "acceptance", "mean_log_ratio", "mean_log_trajectory_factor"))
        print(f"| {name} | {passes} | {drafts} | {acc} | {log_r} | {log_f} | "
              f"{m['class_accuracy']:.3f} | "
              f"{m['fid_digits']:.2f} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} "
              f"| x{base / statistics.median(t):.2f} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
