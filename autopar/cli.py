"""The ``autopar`` command: ``plan`` (offline), ``show`` (inspect a plan), ``bench`` (strategies
side by side), ``demo``."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn as nn

from autopar.errors import AutoparError
from autopar.progress import Progress


def _mesh(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"mesh must look like 8 or 2x4, not {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"mesh must look like 8 or 2x4, not {text!r}")
    return shape


def _model(
    name: str, batch: int, seq: int, size: str = "real", device: str = "meta"
) -> tuple[nn.Module, dict]:
    """A zoo model, a built-in one (gpt2-tiny, gpt2, mlp) or ``package.module:factory``, on
    the meta device (or ``device``)."""
    from autopar.models import GPT, MLP, gpt_config, zoo

    with torch.device(device):
        if name in zoo.ZOO:
            return zoo.build(name, size, batch=batch, seq=seq)
        if name in ("gpt2-tiny", "gpt2"):
            cfg = gpt_config(name)
            ids = torch.randint(0, cfg.vocab, (batch, seq))
            if seq > cfg.max_seq:
                raise AutoparError(f"--seq {seq} exceeds {name}'s {cfg.max_seq} positions")
            return GPT(cfg), {"input_ids": ids, "labels": ids.clone()}
        if name == "mlp":
            return MLP(), {"x": torch.randn(batch, 256), "target": torch.randn(batch, 256)}
        if ":" in name:
            module, _, attr = name.partition(":")
            factory = getattr(importlib.import_module(module), attr)
            model, kwargs = factory(batch=batch, seq=seq)
            return model, kwargs
    raise AutoparError(
        f"unknown model {name!r}: use a zoo model ({', '.join(zoo.names())}), gpt2-tiny, gpt2, mlp, "
        "or package.module:factory"
    )


def _add_kernels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels",
        choices=("auto", "fused", "eager"),
        default="auto",
        help="fused norm/GELU kernels: where the gpu runs them (auto), always, or never",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="autopar", description="automatic parallelization for PyTorch")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a model offline (no GPU, no ranks) and print the report")
    p.add_argument(
        "model", help="a zoo model (see autopar.models.zoo), gpt2-tiny, gpt2, mlp, or pkg.module:factory"
    )
    p.add_argument(
        "--size", choices=("real", "tiny"), default="real", help="zoo models: real or tiny dimensions"
    )
    p.add_argument("--mesh", type=_mesh, default=(2, 4))
    p.add_argument("--gpu", default="h100")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--memory-budget", default=None, help='bytes, "60GiB", or "min"')
    p.add_argument(
        "--mixed-precision", choices=("bf16", "fp16"), default=None, help="compute dtype; masters stay"
    )
    p.add_argument("--time-limit", type=float, default=None, help="solver time limit, seconds")
    p.add_argument("--profile", metavar="DB", help="price with the measurements in this profile database")
    _add_kernels(p)
    p.add_argument("-o", "--output", help="write the plan as JSON")
    b = sub.add_parser("bench", help="compare classic strategies and auto on one mesh (offline)")
    b.add_argument("model", help="as for plan")
    b.add_argument("--size", choices=("real", "tiny"), default="real")
    b.add_argument("--mesh", type=_mesh, default=(2, 4))
    b.add_argument(
        "--devices",
        type=int,
        default=None,
        help="instead of --mesh: try every 1-3 axis mesh of this many devices",
    )
    b.add_argument("--gpu", default="h100")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--strategies", default="dp,zero2,zero3,megatron,auto", help="comma-separated")
    b.add_argument("--memory-budget", default=None)
    b.add_argument("--mixed-precision", choices=("bf16", "fp16"), default=None)
    b.add_argument(
        "--run",
        action="store_true",
        help="also measure each plan's step on a local CPU mesh (gloo; --size tiny)",
    )
    b.add_argument("--profile", metavar="DB", help="price with the measurements in this profile database")
    _add_kernels(b)
    b.add_argument("--json", help="write the table as JSON")
    b.add_argument("--plot", help="draw step time and peak memory per strategy (PNG; needs matplotlib)")
    f = sub.add_parser(
        "profile", help="measure ops and collectives on the mesh's devices into a profile database"
    )
    f.add_argument("model", help="as for plan")
    f.add_argument("--size", choices=("real", "tiny"), default="real")
    f.add_argument("--mesh", type=_mesh, default=(2, 2))
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--seq", type=int, default=128)
    f.add_argument("--mixed-precision", choices=("bf16", "fp16"), default=None)
    f.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    f.add_argument("--db", default="autopar-profile.json", help="the database to merge into")
    s = sub.add_parser("show", help="print the report of a saved plan")
    s.add_argument("plan")
    s.add_argument("--explain", metavar="NODE", help="why NODE has its layout, and what was turned down")
    s.add_argument(
        "--html", metavar="PATH", help="also write a self-contained HTML report (needs matplotlib)"
    )
    d = sub.add_parser("demo", help="plan and train a small GPT on 4 local CPU processes")
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--strategy", default="auto")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except AutoparError as exc:
        print(f"autopar: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from autopar.demo import run_demo

        return run_demo(args.steps, args.strategy)
    from autopar.solver.plan import load_plan

    if args.command == "show":
        plan = load_plan(args.plan)
        print(plan.explain(args.explain) if args.explain else plan.report())
        if args.html:
            try:
                from autopar.html_report import write_html

                write_html(plan, args.html)
            except ImportError:
                raise AutoparError("--html needs matplotlib: pip install 'autopar[plot]'") from None
            print(f"report written to {args.html}")
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "profile":
        return _profile(args)
    from autopar.api import make_plan

    model, kwargs = _model(args.model, args.batch, args.seq, args.size)
    progress = Progress(3)
    plan = make_plan(
        model,
        (),
        args.mesh,
        example_kwargs=kwargs,
        gpu=args.gpu,
        strategy=args.strategy,
        memory_budget=args.memory_budget,
        time_limit_s=args.time_limit,
        mixed_precision=args.mixed_precision,
        progress=progress,
        profile=args.profile,
        kernels=args.kernels,
    )
    progress.done()
    print(plan.report())
    t = plan.timings_s
    print(
        f"\nplanned in {t['trace_s'] + t['strategies_s'] + t['solve_s']:.2f} s "
        f"(trace {t['trace_s']:.2f}, strategies {t['strategies_s']:.2f}, solve {t['solve_s']:.2f})"
    )
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from autopar import bench

    if args.run and (args.size != "tiny" or args.devices):
        raise AutoparError("--run builds the model on every local rank: use it with --size tiny and --mesh")
    # --run plans the model it runs: traced on the meta device a model may take other paths
    model, kwargs = _model(args.model, args.batch, args.seq, args.size, "cpu" if args.run else "meta")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    meshes = bench.mesh_shapes(args.devices) if args.devices else [args.mesh]
    progress = Progress(1 + len(meshes) * len(strategies))
    rows = bench.compare(
        model,
        kwargs,
        meshes,
        strategies,
        gpu=args.gpu,
        memory_budget=args.memory_budget,
        mixed_precision=args.mixed_precision,
        progress=progress,
        profile=args.profile,
        kernels=args.kernels,
    )
    progress.done()
    if args.run:
        bench.measure(rows, _model, (args.model, args.batch, args.seq, "tiny", "cpu"))
    mesh = f"{args.devices} devices" if args.devices else "x".join(map(str, args.mesh))
    print(f"{args.model} on {mesh} ({args.gpu}), batch {args.batch}, seq {args.seq}")
    print(bench.table(rows))
    if args.json:
        bench.write_json(rows, args.json)
        print(f"table written to {args.json}")
    if args.plot:
        try:
            bench.plot(rows, args.plot, f"{args.model} on {mesh} {args.gpu}")
        except ImportError:
            raise AutoparError("--plot needs matplotlib: pip install 'autopar[plot]'") from None
        print(f"chart written to {args.plot}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    """Under torchrun (``RANK`` set) profile this job's GPUs; else a local CPU mesh over gloo.
    The model is built on the meta device: a profile needs its graph's shapes, not its weights
    (GPT-2 small's took 6.5 s to make on each rank of the CPU mesh)."""
    import os

    from autopar.cost import profiler

    if "RANK" in os.environ:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.manual_seed(0)
        model, kwargs = _model(args.model, args.batch, args.seq, args.size)
        mesh = init_device_mesh(device, args.mesh)
        progress = Progress() if dist.get_rank() == 0 else None
        summary = profiler.profile_model(
            model,
            kwargs,
            mesh,
            args.db,
            repeats=args.repeats,
            mixed_precision=args.mixed_precision,
            progress=progress,
        )
        speak = dist.get_rank() == 0
        dist.destroy_process_group()
        if not speak:
            return 0
    else:
        build_args = (args.model, args.batch, args.seq, args.size)
        summary = profiler.profile_local(
            _model,
            build_args,
            args.mesh,
            args.db,
            repeats=args.repeats,
            mixed_precision=args.mixed_precision,
            progress=True,
            start_method="fork",  # this process has only imported: its copy need not import again
        )
        progress = None
    if progress is not None:
        progress.done()
    print(
        f"{summary['signatures']} distinct op signatures ({summary['measured']} measured), "
        f"{summary['collectives']} collective fits, in {summary['seconds']:.1f} s on {summary['device']} "
        f"({', '.join(f'{k[:-2]} {v:.1f} s' for k, v in summary['phases_s'].items())}); merged into {args.db}"
    )
    print(
        f"host speed: a fixed workload took {summary['reference_s'] * 1e3:.2f} ms, moving by "
        f"{summary['speed_spread']:.0%} (90th percentile over 10th) while profiling"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
