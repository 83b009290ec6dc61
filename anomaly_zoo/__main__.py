"""Command line: ``python -m anomaly_zoo list | data | bench``.

    python -m anomaly_zoo list [--family feature]
    python -m anomaly_zoo data list
    python -m anomaly_zoo data make textures [--full] [--seed 0] [--root DIR]
    python -m anomaly_zoo bench --dataset textures --category brick --models padim,ae --quick [--out r.csv]

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
    d.add_argument("name", nargs="?", default=None, help="dataset to make (textures, digits, phantom)")
    d.add_argument("--full", action="store_true", help="full size (256 px, hundreds of images) instead of quick")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--root", default=None, help="data folder (default: $AZOO_DATA, the checkout's data/, a cache)")

    b = sub.add_parser("bench", help="fit and evaluate methods; prints a markdown table")
    b.add_argument("--dataset", default="textures")
    b.add_argument("--category", default=None, help="comma-separated categories (default: all)")
    b.add_argument("--models", required=True, help="comma-separated registry names, e.g. padim,ae")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True, help="quick presets (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="paper presets and full-size data")
    b.add_argument("--device", default="auto")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--root", default=None)
    b.add_argument("--out", default=None, help="also write the table as CSV here")
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
    from . import bench

    t0 = time.perf_counter()
    cats = args.category.split(",") if args.category else None
    df = bench.run([m.strip() for m in args.models.split(",") if m.strip()], dataset=args.dataset,
                   categories=cats, quick=args.quick, device=args.device, seed=args.seed, root=args.root)
    print(bench.to_markdown(df))
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
