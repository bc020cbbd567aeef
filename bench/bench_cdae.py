"""CDAE benchmark: throughput, reconstruction over steps, and the synthetic GO-group check.

Runs, in a work directory (resumable: finished synthesis, records and runs are reused;
their names carry the gene count and size, so other settings never reuse them):
  1. bin/synth --flagfile=configs/synth_quickstart.cfg --n_genes=N (default 160 genes in
     8 GO-like groups: 60 make 5-fold AUCs of 8 groups too noisy to compare);
  2. whole-section records (bin/extract --whole_images, --size);
  3. for each --seeds value: bin/train --flagfile=configs/cdae_quickstart.cfg --seed=S;
  4. for the first seed, bin/export + bin/embed's embed_records (the product path),
     checked against the in-process codes;
  5. per seed, the same genes scored three ways (ish_tf.evaluate.annotations, 5-fold CV
     logistic regression, mean per-group AUC over --cv_seeds): the trained codes, the
     untrained encoder (the same seed's initial weights; its batch-norm statistics
     estimated on clean training images as the trained model's are, and as initialised)
     and pixel PCA to the code size;
  6. how much the decoder uses the code (cdae_baselines.code_reliance);
  7. the supervised variant from the CDAE of each --supervised_seeds value (default: the
     first seed) and from scratch, per-term AUC on the held-out genes next to that CDAE's
     codes (and its untrained initialisation's) + logistic regression fit on the
     training genes;
  8. train-step throughput with --cdae_unpool=switches vs nearest (the baseline, same script),
     for the config's model and any --throughput_configs (the paper-sized model).

Usage:
  .venv/bin/python bench/bench_cdae.py [--work=/tmp/ish_cdae_bench] [--seeds=0,1,2]
      [--n_genes=160] [--size=64] [--steps=0] [--extra="--cdae_code_pooling=average"]
      [--split_fractions=0.6,0.1,0.3] [--supervised_steps=400]
      [--supervised_seeds=0,1,2] [--skip_throughput]
      [--throughput_configs configs/cdae_mouse.cfg] [--throughput_steps=5]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def config_model(flagfile: str, extra: list[str] = ()):
    """(ModelConfig, batch size) of a training flagfile (and extra flags after it), read
    through the flags edge."""
    from ish_tf import cli
    from ish_tf.cli import train as train_cli

    model_config = train_cli.model_config(cli.parse("train", [f"--flagfile={flagfile}", *extra]))
    return model_config, int(model_config.family.global_batch_size)


def throughput(flagfile: str, unpool: str, steps: int = 30, extra: list[str] = (),
               pool_implementation: str = "kernel", jit: bool = False) -> tuple[float, str]:
    """Images/s of the CDAE train step (forward, loss, backward, Adam) of a config's model
    and batch size (with `extra` flags) on random images, with --cdae_unpool forced to `unpool`
    and the switch pooling's implementation to `pool_implementation`, XLA-compiled with
    `jit`; and the shape."""
    import dataclasses

    import keras
    import tensorflow as tf

    from ish_tf.families import build_model
    from ish_tf.families.cdae.model import cdae_options

    config, batch = config_model(flagfile, extra)
    config = dataclasses.replace(config, family=dataclasses.replace(
        config.family, unpool=unpool, pool_implementation=pool_implementation))
    opts = cdae_options(config)
    model = build_model(config)
    opt = keras.optimizers.Adam(1e-3)
    x = tf.random.uniform((batch, opts["height"], opts["width"], 1), 0, 255, seed=0)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            _, recon = model(x, training=True)
            loss = tf.reduce_mean(tf.square(recon - (1.0 - x / 255.0)))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    shape = f"{opts['height']}x{opts['width']}, batch {batch}"
    return batch * steps / (time.perf_counter() - t), shape


def generator_tables(synth: str):
    """Reference rows: the generator's own per-gene parameters (specs.json) as embeddings.

    `section_params`: what a whole section downsampled to 64 px can show (level, per-layer
    profile, white matter, expressing fraction, cell classes, pattern); `all_params` adds
    the cell-scale ones (cell size, elongation, punctate texture, neuropil, intensity
    spread) that such a section blurs away. Noise-free: an upper reference for codes of
    the images, not a bound.
    """
    import json

    import numpy as np
    import pandas as pd

    from ish_tf.data.embeddings import EmbeddingTable

    with open(os.path.join(synth, "specs.json")) as f:
        genes = json.load(f)["genes"]
    patterns = sorted({g["pattern"] for g in genes})
    section = [[g["intensity"], g["wm_expression"], g["fraction"], *g["profile"],
                *g["class_weights"], *[float(g["pattern"] == p) for p in patterns]]
               for g in genes]
    cell = [[g["cell_size"], g["elongation"], g["punctate"], g["neuropil"], g["intensity_cv"]]
            for g in genes]
    keys = pd.DataFrame({"gene_symbol": [g["symbol"] for g in genes]})
    return {"section_params": EmbeddingTable(keys, np.asarray(section, np.float32)),
            "all_params": EmbeddingTable(keys.copy(), np.hstack([section, cell]).astype(np.float32))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ish_cdae_bench")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "cdae_quickstart.cfg"))
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (one run each)")
    ap.add_argument("--cv_seeds", default="0,1,2", help="cross-validation fold seeds")
    ap.add_argument("--n_genes", type=int, default=160)
    ap.add_argument("--steps", type=int, default=0, help="override --steps (0 = the config's)")
    ap.add_argument("--size", type=int, default=64, help="whole-section size")
    ap.add_argument("--extra", default="", help="extra bin/train flags")
    ap.add_argument("--split_fractions", default="0.6,0.1,0.3",
                    help="genes per split; 30%% held out gives the supervised comparison "
                         "~6 test genes per group (the quickstart extracts 0.8,0.1,0.1)")
    ap.add_argument("--run", default="run", help="run directory prefix under --work")
    ap.add_argument("--supervised_steps", type=int, default=400, help="0 = skip")
    ap.add_argument("--supervised_seeds", default="",
                    help="training seeds whose CDAE starts a supervised run (and a run from "
                         "scratch with the same seed); default: the first of --seeds")
    ap.add_argument("--skip_throughput", action="store_true")
    ap.add_argument("--throughput_configs", nargs="*", default=[],
                    help="more flagfiles whose model's train step to time (e.g. "
                         "configs/cdae_mouse.cfg, the paper-sized model)")
    ap.add_argument("--throughput_steps", type=int, default=5,
                    help="timed steps for --throughput_configs")
    args = ap.parse_args()
    work = args.work
    seeds = [int(s) for s in args.seeds.split(",")]
    cv_seeds = [int(s) for s in args.cv_seeds.split(",")]
    # The gene count is in the names: a synthesis (and its records) of another size in the
    # same work directory is never mistaken for this one's.
    synth = os.path.join(work, f"synth_{args.n_genes}g")
    records = os.path.join(work, f"whole{args.size}_{args.n_genes}g")
    os.makedirs(work, exist_ok=True)
    if os.path.exists(os.path.join(synth, "manifest.csv")):
        import json

        with open(os.path.join(synth, "specs.json")) as f:
            made = json.load(f)["config"]["n_genes"]
        if made != args.n_genes:
            sys.exit(f"{synth} holds {made} genes, not {args.n_genes}: remove it or use "
                     "another --work")
    else:
        sh([os.path.join(ROOT, "bin", "synth"),
            f"--flagfile={os.path.join(ROOT, 'configs', 'synth_quickstart.cfg')}",
            f"--out={synth}", f"--n_genes={args.n_genes}", "--synth_workers=2"])
    t = time.perf_counter()
    sh([os.path.join(ROOT, "bin", "extract"), f"--manifest={synth}/manifest.csv",
        f"--out={records}", "--whole_images", f"--whole_size={args.size}", "--format=png",
        "--num_shards=4", "--workers=2", f"--split_fractions={args.split_fractions}"])
    print(f"whole-section extraction: {time.perf_counter() - t:.1f} s")
    runs = {}
    tag = f"{args.run}_{args.size}px_{args.n_genes}g"  # runs resume: never across data sets
    for seed in seeds:
        run = runs[seed] = os.path.join(work, f"{tag}_s{seed}")
        train = [os.path.join(ROOT, "bin", "train"), f"--flagfile={args.config}",
                 f"--records_dir={records}", f"--run_dir={run}", f"--input_size={args.size}",
                 f"--seed={seed}"]
        if args.steps:
            train.append(f"--steps={args.steps}")
        train += shlex.split(args.extra)
        t = time.perf_counter()
        sh(train)
        print(f"training wall time (seed {seed}): {time.perf_counter() - t:.1f} s")

    import keras
    import numpy as np
    import pandas as pd

    import ish_tf.families.cdae.model  # noqa: F401 - registers the custom layers before loading
    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.embed import EmbedConfig, embed_records
    from ish_tf.evaluate import annotations as ann
    from ish_tf.evaluate.go import load_go
    from ish_tf.export.saved_model import export_run
    from ish_tf.families import build_model, load_model_config
    from ish_tf.families.cdae import baselines as cdae_baselines
    from ish_tf.families.cdae import terms as cdae_terms
    from ish_tf.families.cdae.model import cdae_options, encoder_model

    first = runs[seeds[0]]
    metrics = pd.read_csv(os.path.join(first, "metrics.csv"))
    print(f"\nreconstruction over steps, seed {seeds[0]} (mse in [0, 1] units of the noisy "
          "training batch; images/s per interval):")
    print(metrics[["step", "loss", "mse", "mae", "images_per_sec"]].to_string(index=False))
    print(f"median images/s: {metrics['images_per_sec'].iloc[1:].median():.1f}")

    go = load_go(os.path.join(synth, "go.gaf"))
    splits = ["train", "validation", "test"]

    def score(tables: dict) -> dict[str, float]:
        """Mean per-group AUC of each table, averaged over the CV seeds."""
        out: dict[str, list[float]] = {}
        for cv in cv_seeds:
            scoring = ann.ScoringConfig(n_splits=5, seed=cv, min_genes=3,
                                        size_bounds={"go": (3, 500)}, n_jobs=2)
            results, _, _ = ann.evaluate_many(tables, [go], scoring)
            for name, auc in results.groupby("embedding")["auc"].mean().items():
                out.setdefault(str(name), []).append(float(auc))
        return {k: float(np.mean(v)) for k, v in out.items()}

    rows = []
    pca_table = train_pixels = None
    for seed, run in runs.items():
        config = load_model_config(os.path.join(run, "model_config.json"))
        opts = cdae_options(config)
        model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
        keys, codes = cdae_terms.predict_records(encoder_model(model), records, splits)
        # The untrained encoder with its batch-norm statistics estimated on clean training
        # images, as the trained model's are (the product's baseline), and as initialised.
        tables = {"cdae": cdae_baselines.gene_tables(keys, codes, "cdae")[1],
                  "untrained_encoder": cdae_baselines.untrained_encoder(config, records)[1],
                  "untrained_init_bn": cdae_baselines.untrained_encoder(
                      config, records, recalibrate=False)[1]}
        if pca_table is None:
            pca_table = cdae_baselines.pixel_pca(records, opts["code_size"], opts["height"],
                                            opts["width"], invert=opts["invert"])[1]
        tables["pixels_pca"] = pca_table
        if seed == seeds[0]:  # the product path: SavedModel -> bin/embed's gene table
            export = export_run(run, os.path.join(work, f"export_{tag}"), overwrite=True,
                                version=1)
            emb_dir = os.path.join(work, f"embeddings_{tag}")
            embed_records(EmbedConfig(saved_model=export, records_dir=records,
                                      out_dir=emb_dir).validate())
            served = read_embedding_table(os.path.join(emb_dir, "gene_embeddings.csv"))
            mine = tables["cdae"]
            order = pd.Index(served.keys["gene_symbol"]).get_indexer(mine.keys["gene_symbol"])
            diff = float(np.abs(served.values[order] - mine.values).max())
            print(f"bin/embed gene codes vs in-process codes: max |diff| {diff:.2e}")
        aucs = score(tables)
        if train_pixels is None:  # the same images for every seed's reliance
            train_pixels = cdae_baselines.whole_pixels(records, "train", opts["height"],
                                                  opts["width"])[1][:512]
        reliance = cdae_baselines.code_reliance(model, train_pixels, invert=opts["invert"])
        rows.append({"seed": seed, **aucs, **reliance})
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()
                                            if k != "seed"), flush=True)
    table = pd.DataFrame(rows)
    names = ["cdae", "untrained_encoder", "untrained_init_bn", "pixels_pca"]
    reference = score(generator_tables(synth))
    print(f"\nGO-like group prediction, {args.n_genes} synthetic genes in 8 groups "
          f"(5-fold CV x {len(cv_seeds)} fold seeds, mean per-group AUC), "
          f"{len(seeds)} training seed(s):")
    print(table[["seed", *names]].round(4).to_string(index=False))
    for name in names:
        print(f"  {name:18s} mean {table[name].mean():.4f}  sd {table[name].std(ddof=0):.4f}")
    wins = int((table["cdae"] > table["untrained_encoder"]).sum())
    both = int((table["cdae"] > table[["untrained_encoder", "untrained_init_bn"]].max(axis=1)).sum())
    print(f"cdae > its own untrained initialisation in {wins} of {len(table)} seeds "
          f"({both} with either batch-norm statistics); "
          f"mean ratio cdae / untrained {(table['cdae'] / table['untrained_encoder']).mean():.3f},"
          f" cdae / pixels_pca {(table['cdae'] / table['pixels_pca']).mean():.3f}")
    print("reference, the generator's own gene parameters (noise-free, same scoring): "
          f"section-scale {reference['section_params']:.4f}, with cell-scale "
          f"{reference['all_params']:.4f}")
    print("\nreconstruction error of the trained models on training images ([0, 1] units):")
    print(table[["seed", "mse", "mse_mean_code", "mse_mean_image", "code_share"]]
          .round(5).to_string(index=False))

    if args.supervised_steps:
        sup_seeds = ([int(v) for v in args.supervised_seeds.split(",")]
                     if args.supervised_seeds else seeds[:1])
        missing = [v for v in sup_seeds if v not in runs]
        if missing:
            raise SystemExit(f"--supervised_seeds {missing} are not among --seeds {seeds}")
        groups = cdae_terms.load_term_groups(gaf=os.path.join(synth, "go.gaf"))
        means = []
        for seed in sup_seeds:
            cdae_run, sup_runs = runs[seed], {}
            for name, init in (("supervised", cdae_run), ("supervised_scratch", "")):
                sup = sup_runs[name] = os.path.join(work, f"{tag}_{name}_s{seed}")
                sh([os.path.join(ROOT, "bin", "train"), f"--flagfile={args.config}",
                    "--model=cdae_supervised", f"--records_dir={records}", f"--run_dir={sup}",
                    f"--input_size={args.size}", f"--seed={seed}", f"--cdae_init_from={init}",
                    f"--cdae_gaf={os.path.join(synth, 'go.gaf')}", "--cdae_term_min_genes=5",
                    f"--steps={args.supervised_steps}",
                    f"--decay_start={args.supervised_steps // 2}", "--learning_rate=3e-4",
                    *shlex.split(args.extra)])
                sh([os.path.join(ROOT, "bin", "cdae"), "term_auc", f"--run_dir={sup}",
                    f"--codes_run={cdae_run}"])
            terms = pd.read_csv(os.path.join(sup_runs["supervised"], "term_auc_test.csv"))
            scratch = pd.read_csv(os.path.join(sup_runs["supervised_scratch"],
                                               "term_auc_test.csv"))
            terms.insert(4, "auc_scratch", scratch["auc"].to_numpy())
            # The same two-stage scoring of the untrained encoder (this seed's init).
            untrained = encoder_model(build_model(load_model_config(
                os.path.join(cdae_run, "model_config.json"))))
            terms["auc_untrained_lr"] = cdae_terms.codes_term_auc(
                untrained, records, terms["term"].tolist(), groups)["auc"].to_numpy()
            print(f"\nseed {seed}: per-term AUC on the held-out test genes: supervised end to "
                  "end (from the CDAE; from scratch) vs codes + logistic regression fit on "
                  "the train + validation genes (the CDAE's; its untrained initialisation's):")
            print(terms.round(3).to_string(index=False))
            aucs = [c for c in terms.columns if c.startswith("auc")]
            means.append({"seed": seed, **{c: float(terms[c].mean()) for c in aucs}})
            print("mean: " + ", ".join(f"{c} {terms[c].mean():.3f}" for c in aucs))
        means = pd.DataFrame(means)
        print(f"\nsupervised vs two-stage, mean per-term AUC on the test genes, "
              f"{len(means)} seed(s):")
        print(means.round(3).to_string(index=False))
        for col in means.columns[1:]:
            print(f"  {col:18s} mean {means[col].mean():.3f}  sd {means[col].std(ddof=0):.3f}")

    if not args.skip_throughput:
        # The trained model (the config with --size and --extra), then any other configs.
        trained = [f"--input_size={args.size}", *shlex.split(args.extra)]
        for flagfile, steps, extra in [(args.config, 30, trained)] + [
                (f, args.throughput_steps, []) for f in args.throughput_configs]:
            base, shape = throughput(flagfile, "nearest", steps, extra)
            sw, _ = throughput(flagfile, "switches", steps, extra)
            print(f"\ntrain-step throughput of {os.path.basename(flagfile)}'s model ({shape}): "
                  f"nearest {base:.1f} img/s, switches {sw:.1f} img/s, ratio switches/nearest "
                  f"{sw / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
