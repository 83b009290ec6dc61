"""Command line: ``python -m anomaly_zoo list | data | bench``.

    python -m anomaly_zoo list [--family feature]
    python -m anomaly_zoo data list
    python -m anomaly_zoo data make textures [--full] [--seed 0] [--root DIR]
    python -m anomaly_zoo bench --dataset textures --category brick --models padim,ae --quick [--out r.csv]
    python -m anomaly_zoo bench --models all --datasets textures,phantom --seeds 0,1,2 --out results/quick.csv \
        [--engine ray [--address HOST:PORT]]

User errors print one line (``error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        sub = self.prog.split()[1:]  # "anomaly_zoo bench" -> ["bench"]; the top level -> []
        raise SystemExit(_fail(f"{message} (see: python -m {' '.join(['anomaly_zoo', *sub, '--help'])})"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="anomaly_zoo", description="anomaly_zoo command line")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="model cards of every registered method")
    ls.add_argument("--family", default=None)

    d = sub.add_parser("data", help="list or generate the offline datasets")
    d.add_argument("action", choices=["list", "make"])
    d.add_argument("name", nargs="?", default=None, help="dataset to make (textures, digits, phantom, retina)")
    d.add_argument("--full", action="store_true", help="full size (256 px, hundreds of images) instead of quick")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--root", default=None, help="data folder (default: $AZOO_DATA, the checkout's data/, a cache)")

    b = sub.add_parser("bench", help="the leaderboard sweep: models x datasets x seeds, one CSV row each")
    which = b.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", help="comma-separated registry names (e.g. padim,ae) or 'all'")
    which.add_argument("--family", help="every model of a family (e.g. flow)")
    b.add_argument("--datasets", default=None,
                   help="comma-separated datasets, each optionally with '+'-joined categories: "
                        "textures:brick+grass,phantom,digits:class_3 (default: --dataset/--category)")
    b.add_argument("--dataset", default="textures", help="one dataset (when --datasets is not given)")
    b.add_argument("--category", default=None, help="comma-separated categories of --dataset (default: all)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True, help="quick presets (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="paper presets and full-size data")
    b.add_argument("--device", default="auto")
    b.add_argument("--seeds", default=None, help="comma-separated data/model seeds, e.g. 0,1,2 (default: --seed)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--root", default=None)
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: in this process, one row after the other; ray: one Ray task per row")
    b.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    b.add_argument("--out", default=None, help="CSV to append rows to; rows already there are skipped (resume)")

    c = sub.add_parser("cost", help="fit and predict time and peak memory of some models, quick or full preset")
    c.add_argument("--models", required=True, help="comma-separated registry names")
    c.add_argument("--dataset", default="textures")
    c.add_argument("--category", default="brick")
    cmode = c.add_mutually_exclusive_group()
    cmode.add_argument("--quick", dest="quick", action="store_true", default=True, help="quick preset (default)")
    cmode.add_argument("--full", dest="quick", action="store_false",
                       help="paper preset, full-size data; fit timed at --epochs and extrapolated")
    c.add_argument("--epochs", default="1,2", help="the two epoch counts a full-preset fit is timed at")
    c.add_argument("--threads", type=int, default=2, help="torch threads of each run (default 2)")
    c.add_argument("--predict-images", type=int, default=16, help="test images a full-preset prediction is timed on")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--root", default=None)
    c.add_argument("--out", default=None, help="CSV to append rows to")
    return p


def main(argv=None) -> int:
    from .utils import AnomalyZooError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return _run(args)
    except (AnomalyZooError, FileNotFoundError, KeyError) as err:
        return _fail(str(err).strip("'\""))


def _run(args) -> int:
    import anomaly_zoo as az

    if args.cmd == "list":
        df = az.list_models(family=args.family, as_frame=True)
        print(az.bench.to_markdown(df.reset_index()[["name", "family", "year", "localizes", "trains", "paper"]]))
        return 0
    if args.cmd == "data":
        if args.action == "list":
            for name in az.data.list_datasets():
                print(name)
            return 0
        if not args.name:
            return _fail("data make needs a dataset name: " + ", ".join(az.data.list_datasets()))
        paths = az.data.make(args.name, quick=not args.full, seed=args.seed, root=args.root)
        for path in paths:
            print(path)
        return 0
    from . import bench, sweep

    if args.cmd == "cost":
        from . import cost

        epochs = [int(e) for e in args.epochs.split(",")]
        df = cost.run([m.strip() for m in args.models.split(",")], args.dataset, args.category,
                      quick=args.quick, epochs=epochs, threads=args.threads, seed=args.seed, root=args.root,
                      predict_images=args.predict_images, out=args.out)
        print(bench.to_markdown(df[["model", "preset", "image_size", "threads", "epochs", "fit_s", "fit",
                                    "predict_ips", "cpu_s", "peak_rss_mb"]]))
        return 0
    t0 = time.perf_counter()
    if args.datasets:
        datasets = args.datasets
    else:
        cats = "+".join(c.strip() for c in args.category.split(",")) if args.category else ""
        datasets = [f"{args.dataset}:{cats}" if cats else args.dataset]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    models = sweep.select_models(args.models, args.family)
    jobs = sweep.plan(models, datasets, seeds, quick=args.quick, device=args.device, root=args.root)
    df = sweep.sweep(jobs, out=args.out, engine=args.engine, address=args.address)
    skipped = len(jobs) - len(df)
    shown = ["model", "dataset", "category", "image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1_max",
             "seed", "fit_s", "predict_ips", "error"]
    print(bench.to_markdown(df[shown]))
    if args.out:
        print(f"wrote {len(df)} row(s) to {args.out}" + (f"; {skipped} already there" if skipped else ""))
    failed = int((df["error"].fillna("") != "").sum())
    print(f"total {time.perf_counter() - t0:.1f} s" + (f"; {failed} row(s) failed" if failed else ""), file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
