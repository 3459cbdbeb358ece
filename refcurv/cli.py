"""``refcurv`` / ``python -m refcurv``.

Commands:
  verify      run every registered check on built-in problems and print a table; exit 0 if
              all hold, 1 if any fails, 2 on bad usage
  sweep       a thorough hypothesis sweep of the test suite sharded by seed (source checkout)
  catalogue   print the method catalogue and the conventions
  golden      golden vectors: export a directory, check one (exit 1 if anything fails), list
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import RefcurvError


class _Parser(argparse.ArgumentParser):
    """Bad usage: one line on stderr and exit status 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser():
    p = _Parser(prog="refcurv", description="refcurv — reference and verification suite for "
                "curvature-based optimizers.", formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Run 'refcurv verify' to check every identity and method on this machine.")
    p.add_argument("--version", action="version", version=f"refcurv {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{verify,sweep,catalogue,golden}")
    v = sub.add_parser("verify", help="run the checks and print a table (exit 1 on any failure)",
                       description="Run every registered check (foundation, linear algebra, every "
                       "method's dense-vs-fast agreement and curvature operator) on built-in "
                       "problems and print a table. Exit status: 0 all hold, 1 a check failed, "
                       "2 bad usage.")
    v.add_argument("--method", help="only checks of methods whose name contains this")
    v.add_argument("--check", help="only checks whose name contains this")
    tier = v.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="the quick tier (one problem per check)")
    tier.add_argument("--thorough", action="store_true", help="every check over several seeds")
    v.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the problems (default 0)")
    v.add_argument("--json", metavar="FILE", type=_json_target,
                   help="write the report (with the environment) to FILE")
    v.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend")
    v.add_argument("--jobs", type=_pos_int, default=1, help="worker processes (one BLAS thread each)")
    v.add_argument("--dask", metavar="ADDRESS", help="run the checks as tasks on the Dask scheduler at "
                   "ADDRESS (extra 'distributed'), one BLAS thread per task")
    w = sub.add_parser("sweep", help="hypothesis sweep of the test suite sharded by seed",
                       description="Run the test suite (from a source checkout) SHARDS times under a "
                       "hypothesis profile, shard i with --hypothesis-seed=SEED+i, on a local pool or "
                       "a Dask cluster. Exit status 1 if any shard fails.")
    w.add_argument("--shards", type=_pos_int, default=2, help="number of shards (default 2)")
    w.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the first shard")
    w.add_argument("--profile", choices=("dev", "ci", "thorough"), default="thorough")
    w.add_argument("--jobs", type=_pos_int, default=1, help="shards run at once locally")
    w.add_argument("--dask", metavar="ADDRESS", help="run the shards on the Dask scheduler at ADDRESS")
    w.add_argument("pytest_args", nargs="*", default=["tests"], help="passed to pytest (default: tests)")
    sub.add_parser("catalogue", help="print the method catalogue and the conventions",
                   description="Print the method catalogue, the curvature builders and the conventions.")
    _golden_parser(sub)
    return p


def _golden_parser(sub):
    g = sub.add_parser("golden", help="golden vectors: export, check, list",
                       description="Golden vectors: .npz arrays and a manifest.json (sha256, tolerance and "
                       "flags per case) that any implementation can be checked against.")
    gs = g.add_subparsers(dest="golden_command", parser_class=_Parser, metavar="{export,check,list}")
    e = gs.add_parser("export", help="compute cases and write DIR (manifest.json + one .npz per case)",
                      description="Compute golden cases with refcurv and write them to --out DIR. Without "
                      "--method/--quantity: every case of the catalogue (every registered method, every "
                      "quantity).")
    e.add_argument("--method", action="append", metavar="M", help="a registered method (repeatable)")
    e.add_argument("--quantity", action="append", metavar="Q", help="a curvature quantity (repeatable)")
    e.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    c = gs.add_parser("check", help="verify DIR: sha256 of every array, then recompute and compare",
                      description="Verify a golden directory: every array against its sha256, then every "
                      "output recomputed by refcurv and compared with the manifest's tolerance. Exit "
                      "status: 0 all hold, 1 a case fails or the directory cannot be trusted (one line).")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--case", action="append", metavar="ID", help="only this case id (repeatable)")
    ls = gs.add_parser("list", help="list the cases and flags of the shipped set (or --dir)",
                       description="List the cases (id, kind, method or quantity, steps, flags) and the "
                       "flag descriptions of a golden directory (default: the shipped set).")
    ls.add_argument("--dir", metavar="DIR", help="a golden directory (default: the shipped set)")


def golden(args, out=None):
    """``refcurv golden export|check|list``; a directory that cannot be trusted or a failing
    case is one line on stderr and exit status 1."""
    from .golden import DATA_DIR, GoldenError, check, export, load_manifest

    out = out or sys.stdout
    cmd = args.golden_command
    try:
        if cmd == "export":
            if args.method:
                from .methods import REGISTRY

                for m in args.method:
                    REGISTRY[m]  # an unknown name: UnknownMethodError listing the registered ones
            if args.quantity:
                from .golden.cases import FUNCTION

                known = set(FUNCTION) | set(FUNCTION.values())
                for q in args.quantity:
                    if q not in known:
                        sys.stderr.write(f"refcurv golden export: error: unknown quantity {q!r}; known: "
                                         f"{', '.join(sorted(known))}\n")
                        return 2
            m = export(args.out, methods=args.method, quantities=args.quantity)
            out.write(f"wrote {len(m['cases'])} cases to {args.out}\n")
            return 0
        if cmd == "check":
            results = check(args.dir, ids=set(args.case) if args.case else None)
            if not results:
                sys.stderr.write("refcurv golden check: error: no case matches --case\n")
                return 1
            head = ("case", "outputs", "max error/tolerance", "verdict")
            rows = [(r.id, str(r.n_outputs), f"{r.max_ratio:.2e}", "pass" if r.passed else f"FAIL ({r.worst})")
                    for r in results]
            w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            for r in [head, tuple("-" * x for x in w)] + rows:
                out.write("  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip() + "\n")
            bad = [r for r in results if not r.passed]
            out.write(f"\n{len(results) - len(bad)} passed, {len(bad)} failed ({args.dir})\n")
            return 1 if bad else 0
        if cmd == "list":
            d = args.dir or DATA_DIR
            m = load_manifest(d)
            for c in m["cases"]:
                what = c.get("method") or c.get("quantity")
                out.write(f"{c['id']:<60} {c['kind']:<8} {what:<22} steps={c['steps']}  "
                          f"flags={','.join(c['flags']) or '-'}\n")
            out.write(f"\n{len(m['cases'])} cases in {d}\n\nflags:\n")
            for f, text in sorted(m["flag_descriptions"].items()):
                out.write(f"  {f}: {text}\n")
            return 0
    except GoldenError as e:
        sys.stderr.write(f"refcurv golden {cmd}: error: {e}\n")
        return 1
    sys.stderr.write("refcurv golden: error: choose export, check or list (see 'refcurv golden --help')\n")
    return 2


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return v


def _pos_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return v


def _fmt(x):
    return "—" if x != x else f"{x:.2e}"


def _table(results, out):
    """The table: with rich if installed (the ``verify`` extra), plain text otherwise."""
    head = ("area", "method", "check", "problem", "max error", "tolerance", "verdict")
    rows = [(r.area, r.method, r.check, r.problem, _fmt(r.error), _fmt(r.tolerance),
             "pass" if r.passed else "FAIL") for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out.write(line(head) + "\n" + line(["-" * w for w in widths]) + "\n")
        for r in rows:
            out.write(line(r) + "\n")
        return
    t = Table(*head)
    for r in rows:
        t.add_row(*r, style=None if r[-1] == "pass" else "bold red")
    Console(file=out, width=140).print(t)


def verify(args, out=None):
    from .verify import environment, run, select

    out = out or sys.stdout
    if args.backend == "cupy":
        from .backend import _cupy

        if _cupy is None or not _cupy.is_available():
            sys.stderr.write("refcurv verify: error: --backend cupy needs CuPy and a CUDA device\n")
            return 2
    if args.dask is not None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            sys.stderr.write("refcurv verify: error: --dask needs the 'distributed' extra "
                             "(pip install 'refcurv[distributed]')\n")
            return 2
    checks = select(method=args.method, check=args.check, quick=args.quick)
    if not checks:
        sys.stderr.write("refcurv verify: error: no check matches the selection\n")
        return 2
    seeds = [args.seed + i for i in range(3)] if args.thorough else [args.seed]
    results = []
    total = len(checks) * len(seeds)
    try:
        from rich.progress import Progress

        with Progress(console=None, transient=True) as prog:
            task = prog.add_task("verifying", total=total)
            for s in seeds:
                results += run(checks, seed=s, jobs=args.jobs, backend=args.backend, dask=args.dask,
                               progress=lambda r: prog.advance(task))
    except ImportError:
        done = [0]

        tty = sys.stderr.isatty()

        def tick(r):
            done[0] += 1
            if tty:
                sys.stderr.write(f"\r[{done[0]}/{total}] {r.id[:70]:<70}")
                sys.stderr.flush()

        for s in seeds:
            results += run(checks, seed=s, jobs=args.jobs, backend=args.backend, dask=args.dask, progress=tick)
        if tty:
            sys.stderr.write("\n")
    _table(results, out)
    failed = [r for r in results if not r.passed]
    out.write(f"\n{len(results) - len(failed)} passed, {len(failed)} failed "
              f"({sum(r.seconds for r in results):.1f} s of checks, seed {args.seed}, "
              f"backend {args.backend}, jobs {args.jobs})\n")
    for r in failed:
        out.write(f"FAILED {r.id}: {r.detail}\n")
    if args.json:
        report = {"schema": 1, "environment": environment(args.seed, args.backend, args.jobs),
                  "passed": not failed, "results": [_json_safe(r.asdict()) for r in results]}
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str, allow_nan=False)
    return 1 if failed else 0


def _json_safe(d):
    """NaN (a check that raised has no error) is ``null`` in strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def _json_target(path):
    """Refuse an unwritable ``--json`` path before the run, in one line."""
    import os

    d = os.path.dirname(os.path.abspath(path)) if path else ""
    if not path or not os.path.isdir(d) or not os.access(d, os.W_OK) or os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write the report to {path!r}")
    return path


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    try:
        return _dispatch(p, args)
    except KeyboardInterrupt:
        sys.stderr.write("refcurv: interrupted\n")
        return 130
    except (OSError, TimeoutError) as e:  # e.g. a Dask scheduler that cannot be reached
        sys.stderr.write(f"refcurv {args.command}: error: {type(e).__name__}: {e}\n")
        return 2
    except RefcurvError as e:  # bad input found after parsing (e.g. a malformed Dask address)
        sys.stderr.write(f"refcurv {args.command}: error: {e}\n")
        return 2


def _dispatch(p, args):
    if args.command == "verify":
        return verify(args)
    if args.command == "sweep":
        import importlib.util

        from .verify.sweep import sweep

        missing = [m for m, need in (("pytest", True), ("hypothesis", True), ("distributed", args.dask is not None))
                   if need and importlib.util.find_spec(m) is None]
        if missing:
            sys.stderr.write(f"refcurv sweep: error: needs {', '.join(missing)} (pip install 'refcurv[test]')\n")
            return 2

        shards = sweep(args.shards, args.seed, args.pytest_args or ["tests"], jobs=args.jobs,
                       dask=args.dask, profile=args.profile)
        for sh in shards:
            sys.stdout.write(f"seed {sh.seed}: {'pass' if sh.passed else 'FAIL'}  {sh.summary}\n")
        bad = sum(not sh.passed for sh in shards)
        sys.stdout.write(f"{len(shards) - bad} passed, {bad} failed\n")
        return 1 if bad else 0
    if args.command == "golden":
        return golden(args)
    if args.command == "catalogue":
        from .catalogue import render

        sys.stdout.write(render() + "\n")
        return 0
    p.print_help()
    return 0
