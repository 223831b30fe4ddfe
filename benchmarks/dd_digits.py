"""Distilled Decoding on digits: quality and speed of the DD1 student against its teacher.

    python -m benchmarks.dd_digits --family llamagen|var [--workdir runs/dd_digits_<family>]
                                   [--dd2-workdir runs/dd2_digits_var]
                                   [--per-class 40] [--batches 1 64] [--rounds 3]

Trains (or resumes) `experiments.dd_imagenet --config digits_<family>` in the work dir
(teacher, flow-map pairs, student), then samples 10 x `per-class` images with: the teacher
(its own categorical sampler), the teacher's flow map (the same law by construction: a check),
DD 1-step, DD 2-step (k = 0, t2), teacher-involved (the teacher re-samples units
t2/2..t2-1 between the two student passes), and the baseline DD beats, set prediction: every
token drawn at once from its per-class, per-position marginal (counted on the pair data).
With `--dd2-workdir` (VAR) also DD2's generator (`experiments.dd2_imagenet --config
digits_var`, trained or resumed there) in one step and teacher-refined (the teacher re-samples
the last two scales).
Class accuracy and FID-digits from the project's digits classifier. Seconds per image at each
batch size: the median and spread of `rounds` interleaved rounds after compilation, with the
load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> None:
    from arjax import config as cfglib
    from arjax import sharding
    from arjax.distill.flow import FlowDraw, gaussian_noise
    from arjax.models import bind
    from arjax.sampling.generator import Samples, make_generator
    from benchmarks.digits_evaluator import score_and_time
    from experiments import dd_imagenet as exp

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=("llamagen", "var"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--dd2-workdir", default=None)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    preset = exp.DIGITS_LLAMAGEN if args.family == "llamagen" else exp.DIGITS_VAR
    cfg = cfglib.override(preset, ["eval_samples_per_class=0"])
    built = exp.build(cfg, args.workdir or f"runs/dd_digits_{args.family}", progress=True)
    mesh = sharding.make_mesh(cfg.mesh)
    teacher, codebook, pairs = built["teacher"], built["codebook"], built["pairs"]()
    graphdef = built["model"][0]
    tokenizer = teacher["tokenizer"]
    t2 = cfg.timesteps[-1]
    model = cfg.teacher.model
    length, code_dim = model.seq_len, codebook.shape[-1]

    def student(steps, start=-1):
        sc = dataclasses.replace(cfg.sample, steps=steps, teacher_start=start)
        return (exp.make_sampler(dataclasses.replace(cfg, sample=sc), graphdef, teacher,
                                 codebook, mesh), built["params"])

    flow_map = exp.flow_sampler(cfg, teacher)
    grid = jnp.asarray(cfg.flow.grid())

    def flow_fn(p, f, key, labels):
        noise = gaussian_noise(key, jnp.arange(labels.shape[0]), length, code_dim)
        tokens = flow_map(labels, FlowDraw(noise, f["codebook"], grid))
        images = bind(tokenizer[0], f["tokenizer"]).decode_vectors(f["codebook"][tokens])
        return Samples(images, {"tokens": tokens}, {"target_passes": jnp.int32(exp.units(cfg))})

    labels = np.asarray(pairs.labels)
    codes = pairs.get(np.arange(pairs.num_examples), np.zeros(pairs.num_examples, int))["codes"]
    counts = np.zeros((model.num_classes, length, codebook.shape[0]))
    np.add.at(counts, (labels[:, None], np.arange(length)[None], codes), 1)
    log_marginals = jnp.log(jnp.asarray(counts + 1e-3, jnp.float32))

    def set_prediction(p, f, key, labels):
        tokens = jax.random.categorical(key, f["marginals"][labels]).astype(jnp.int32)
        images = bind(tokenizer[0], f["tokenizer"]).decode_vectors(f["codebook"][tokens])
        return Samples(images, {"tokens": tokens}, {"target_passes": jnp.int32(1)})

    fixed = {"tokenizer": tokenizer[1], "codebook": codebook, "marginals": log_marginals}
    gens = {"teacher": (teacher["generate"], teacher["params"]),
            "teacher flow map": (make_generator(flow_fn, mesh, fixed), None),
            "DD 1-step": student((0,)),
            f"DD 2-step (0, {t2})": student((0, t2))}
    gens[f"teacher-involved ({t2 // 2}..{t2 - 1})"] = student((0, t2), t2 // 2)
    gens["set prediction (marginals)"] = (make_generator(set_prediction, mesh, fixed), None)
    if args.dd2_workdir:
        from experiments import dd2_imagenet as exp2

        cfg2 = cfglib.override(exp2.DIGITS_VAR, ["eval_samples_per_class=0"])
        built2 = exp2.build(cfg2, args.dd2_workdir, progress=True)
        gens["DD2 1-step"] = (built2["generate"], built2["params"])
        refined = dataclasses.replace(cfg2, sample=exp2.DD2SampleConfig(teacher_scales=2))
        gens["DD2 + teacher (last 2 scales)"] = (exp2.make_sampler(
            refined, built2["model"][0], built2["teacher"], mesh), built2["params"])
    rows, _ = score_and_time(gens, args.per_class, rounds=0)

    times = {(name, b): [] for name in gens for b in args.batches}
    for b in args.batches:  # compile each batch size first
        for gen, params in gens.values():
            gen(params, np.arange(b) % 10, jax.random.key(0))
    for r in range(args.rounds):
        for b in args.batches:
            for name, (gen, params) in gens.items():
                out = gen(params, np.arange(b) % 10, jax.random.key(r + 1))
                times[name, b].append(out.stats["seconds"] / b)

    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"digits {args.family} teacher ({built['summary']['teacher/params']} parameters, "
          f"{length} tokens), student {built['summary']['student/params']} parameters, "
          f"{cfg.pairs} pairs, {cfg.student_train.steps} student steps; "
          f"{10 * args.per_class} images per setting")
    head = " | ".join(f"ms / image at batch {b} (median, spread) | speed-up" for b in args.batches)
    print(f"| sampler | passes | class accuracy | FID-digits | {head} |")
    print("|---|---|---|---|" + "---|---|" * len(args.batches))
    for name, m in rows.items():
        cells = []
        for b in args.batches:
            t, base = times[name, b], statistics.median(times["teacher", b])
            cells.append(f"{1e3 * statistics.median(t):.2f} ({1e3 * min(t):.2f}-"
                         f"{1e3 * max(t):.2f}) | x{base / statistics.median(t):.1f}")
        print(f"| {name} | {m['target_passes']} | {m['class_accuracy']:.3f} | "
              f"{m['fid_digits']:.2f} | {' | '.join(cells)} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
