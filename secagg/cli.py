"""The ``secagg`` command: ``demo``, ``simulate``, ``bench``, ``federation``, ``aggregator``,
``threat-model``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from secagg.errors import ConfigurationError, SecAggError


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # (argparse said "invalid _fraction value: 'abc'")
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _delta(text: str) -> float:
    """DP-SGD's delta, in (0, 1): at 0 no epsilon is finite."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # (argparse said "invalid _positive value: 'abc'")
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _params(text: str) -> int:
    """A number of parameters: at most a round's longest vector (2**31 - 1); more was refused
    from inside as "vector_length must be in [1, 2**31 - 1]", naming no flag."""
    value = _positive(text)
    # defence: cli.params-bounded
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be at most 2**31 - 1 (a round's longest "
                                         f"vector), got {text}")
    return value


def _clients(text: str) -> int:
    """A number of sites for a benchmark: as many as a federation may have (init's 3 to
    10,000); 99,999,999,999 ran silently, its memory growing until the machine ran out, and
    2 was refused from inside as "roster must list at least 3 sites" or "--sites must be
    in [3, 10000]", naming a flag the command does not have."""
    value = _positive(text)
    # defence: cli.bench-clients-bounded
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"must be at most 10000 (a federation's most sites), "
                                         f"got {text}")
    # defence: cli.bench-clients-at-least-three
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be at least 3 (a federation's fewest sites), "
                                         f"got {text}")
    return value


def _seed(text: str) -> int:
    """A seed for made-up data: an integer >= 0 (numpy's generators refuse the rest, from
    inside, as "ValueError: expected non-negative integer")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _sites(text: str) -> int:
    value = _positive(text)
    # defence: cli.three-sites-at-least
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be >= 3 (the sum of 2 would reveal the "
                                         f"other's update), got {text}")
    # (`simulate --sites 100000` ran on and on; a federation has at most 10,000)
    # defence: cli.sites-at-most-ten-thousand
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"must be at most 10000 (a federation's most sites), "
                                         f"got {text}")
    return value


def _workers(text: str) -> int:
    """Worker processes for a benchmark: at most 256 (99,999 was taken, and masking's then
    raised "length must be >= processes" from inside; CKKS's said it released with them)."""
    value = _positive(text)
    # defence: cli.bench-workers-bounded
    if value > 256:
        raise argparse.ArgumentTypeError(f"must be at most 256, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    # defence: cli.dp-parameters-positive
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from clients.demo.run import DemoOptions, run

    chosen = {name: getattr(args, name) for name in ("noise_multiplier", "max_grad_norm", "delta")
              if getattr(args, name) is not None}
    given = [f"--{name.replace('_', '-')}" for name in chosen]
    # (without --dp-sgd they were ignored: the demo trained with no privacy and said nothing,
    # to someone who had asked for a noise multiplier)
    # defence: cli.dp-parameters-need-dp-sgd
    if given and not args.dp_sgd:
        raise ConfigurationError(f"{', '.join(given)} "
                                 f"{'applies' if len(given) == 1 else 'apply'} only with --dp-sgd")
    summary = run(DemoOptions(protocol=args.protocol, sites=args.sites, rounds=args.rounds,
                              dataset=args.dataset, dp=args.dp_sgd, out=args.out,
                              json=args.json, **chosen))
    if args.json:
        print(json.dumps(summary))
    return 0


def _neighbors(text: str) -> int | str:
    if text == "auto":
        return text
    return _positive(text)


def _simulate(args: argparse.Namespace) -> int:
    if args.protocol == "ckks":
        if args.dropout is not None:  # (it was ignored: every site took part)
            raise ConfigurationError("--dropout applies only to --protocol masking")
        return _demo_ckks(args)
    dropout = 0.2 if args.dropout is None else args.dropout
    from secagg.masking import RoundConfig, Stage, make_roster, simulate_round

    roster, identities = make_roster(args.sites)
    config = RoundConfig("demo-round-1", roster, vector_length=args.params)
    rng = np.random.default_rng(args.seed)  # demo data only
    inputs = {s: (rng.normal(0, 0.3, args.params), float(rng.integers(100, 5000)) / 5000)
              for s in config.sites}
    stages = [Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK]
    n_drop = round(dropout * args.sites)
    dropped = rng.choice(config.sites, size=n_drop, replace=False)
    dropouts = {int(s): stages[i % len(stages)] for i, s in enumerate(dropped)}

    print(f"secagg simulate: pairwise-masking round of {args.sites} simulated hospital sites, "
          f"{args.params:,} parameters each")
    print(f"  {config.graph.describe()} (corrupt fraction {config.corrupt_fraction})")
    for site, stage in sorted(dropouts.items()):
        print(f"  site {site} will drop out at {stage.name}")
    began = time.perf_counter()
    report = simulate_round(config, identities, inputs, dropouts=dropouts)
    elapsed = time.perf_counter() - began
    for stage_name, seconds in report.stage_seconds.items():
        print(f"  stage {stage_name:<18} {seconds * 1000:8.1f} ms")
    if report.abort is not None or report.result is None:
        print(f"round aborted: {report.abort}")
        return 1
    result = report.result
    survivors = result.survivors
    weights = sum(inputs[s][1] for s in survivors)
    plain_avg = sum(inputs[s][0].clip(-1, 1) * inputs[s][1] for s in survivors) / weights
    err = float(np.max(np.abs(result.average - plain_avg)))
    print(f"  survivors: {len(survivors)} sites {list(survivors)}")
    print(f"  the server learned only the sum; weighted average of {len(survivors)} updates "
          f"recovered in {elapsed:.2f} s")
    print(f"  max |secure average - plaintext average| = {err:.2e} "
          f"(quantisation bound {result.error_bound[0] / result.weight_sum:.2e})")
    return 0


def _demo_ckks(args: argparse.Namespace) -> int:
    from secagg.ckks import (
        CkksClient,
        CkksRoundConfig,
        CkksServer,
        KeyHolder,
        PublicContext,
        ReleaseRequest,
    )
    from secagg.hazmat.key_agreement import AgreementKey
    from secagg.masking import make_roster

    roster, identities = make_roster(args.sites)
    rng = np.random.default_rng(args.seed)  # demo data only
    print(f"secagg simulate: CKKS round of {args.sites} simulated hospital sites, "
          f"{args.params:,} parameters each")
    holder = KeyHolder.generate()
    print(f"  site 1 generated the CKKS key ({holder.preset.name}); key id "
          f"{holder.key_id.hex()[:16]}")
    # a second key holder receives the secret context sealed to its X25519 key
    site2_key = AgreementKey.generate()
    sealed = holder.seal_for(sender=1, sender_identity=identities[1], recipient=2,
                             recipient_public_key=site2_key.public_bytes)
    holder2 = KeyHolder.open_sealed(sealed, recipient=2, recipient_key=site2_key,
                                    sender_identity_public_key=roster[1],
                                    expected_key_id=holder.key_id)
    print(f"  site 2 received the secret context sealed to it ({len(sealed.ciphertext):,} "
          "bytes, AES-256-GCM)")
    public_bytes = holder.public_context().serialize()
    public = PublicContext.load(public_bytes)
    print(f"  the aggregator got the public context ({len(public_bytes):,} bytes, no secret key)")
    announcement = holder.announce(holder=1, identity=identities[1], epoch="demo-ckks-1")
    print("  site 1 signed the key's announcement (valid for one round: a fresh key per round)")
    config = CkksRoundConfig("demo-ckks-1", roster, announcement, (1, 2),
                             vector_length=args.params)
    server = CkksServer(config, public)
    inputs = {s: (rng.normal(0, 0.3, args.params), float(rng.integers(100, 5000)) / 5000)
              for s in roster}
    began = time.perf_counter()
    holders = {1: holder, 2: holder2}
    clients = {}
    total_bytes = 0
    uploads = []
    for site in sorted(roster):
        clients[site] = CkksClient(config, site, identities[site],
                                   holders.get(site, public), inputs[site])
        upload = clients[site].start()
        total_bytes += upload.nbytes
        server.handle(upload)
        uploads.append(upload)
        mode = "seeded, secret-key" if upload.seeded else "public-key"
        print(f"  site {site} uploaded {upload.nbytes:,} bytes ({mode})")
    aggregate = server.close_stage()[1]
    released = clients[1].handle(ReleaseRequest(aggregate, uploads))
    elapsed = time.perf_counter() - began
    weights = sum(w for _, w in inputs.values())
    plain_avg = sum(u.clip(-1, 1) * w for u, w in inputs.values()) / weights
    err = float(np.max(np.abs(released.average - plain_avg)))
    print(f"  the aggregator added {len(aggregate.sites)} ciphertext updates; key holder site 1 "
          "re-added the signed uploads itself, found the aggregate equal to their sum, and "
          f"released the average, flooded and rounded to a {released.grid:.1e} grid "
          f"({elapsed:.2f} s in all)")
    print(f"  max |released average - plaintext average| = {err:.2e}; "
          f"{total_bytes / len(roster) / (args.params + 1):.1f} bytes per value on the wire")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.protocol == "service":
        from secagg.bench.service import run as run_service

        out = run_service(args.service_protocol, args.clients, args.params, quiet=args.json)
    elif args.protocol == "masking":
        from secagg.bench.masking import run

        out = run(args.clients, args.params, args.dropout, args.neighbors, args.threshold,
                  args.seed, quiet=args.json,
                  # (more processes than values: "length must be >= processes" from inside)
                  workers=min(args.workers, args.params),
                  corrupt_fraction=args.corrupt_fraction, dropout_rate=args.dropout_rate)
    else:
        from secagg.bench.ckks import run as run_ckks

        out = run_ckks(args.clients, args.params, args.preset, args.seeded, quiet=args.json,
                       workers=args.workers)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>24}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from secagg import __version__

    parser = argparse.ArgumentParser(prog="secagg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"secagg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="hospital sites train an image classifier together over the service",
        description="Creates a federation in a temporary directory, starts the aggregator and "
                    "one process per site over mTLS on loopback, trains a small CNN on images "
                    "split non-IID across the sites, and compares with plaintext FedAvg.")
    demo.add_argument("--protocol", choices=["masking", "ckks", "both"], default="masking")
    demo.add_argument("--sites", type=_sites, default=5)
    demo.add_argument("--rounds", type=_positive, default=None,
                      help="rounds (default: 15 for digits, 20 otherwise)")
    demo.add_argument("--dataset", default="digits",
                      help="digits (default), fashion-mnist, or folder:PATH")
    demo.add_argument("--dp-sgd", action="store_true",
                      help="also train with DP-SGD (Opacus) and report each site's epsilon")
    demo.add_argument("--noise-multiplier", type=_positive_float, default=None,
                      help="with --dp-sgd (default: 1.0)")
    demo.add_argument("--max-grad-norm", type=_positive_float, default=None,
                      help="with --dp-sgd (default: 1.0)")
    demo.add_argument("--delta", type=_delta, default=None,
                      help="with --dp-sgd (default: 1e-5)")
    demo.add_argument("--out", type=Path, default=None,
                      help="directory for the plot and the JSON summary")
    demo.add_argument("--json", action="store_true", help="print the JSON summary to stdout")
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate", help="one in-process round of simulated sites (no "
                                          "network): the protocols alone")
    sim.add_argument("--sites", type=_sites, default=10)
    sim.add_argument("--params", type=_params, default=100_000)
    sim.add_argument("--dropout", type=_fraction, default=None,
                     help="fraction of sites that drop out, masking only (default: 0.2)")
    sim.add_argument("--seed", type=_seed, default=7, help="seed for the made-up data")
    sim.add_argument("--protocol", choices=["masking", "ckks"], default="masking")
    sim.set_defaults(func=_simulate)

    bench = sub.add_parser("bench", help="benchmarks that print ratios against machine limits")
    bench_sub = bench.add_subparsers(dest="protocol", required=True)
    masking = bench_sub.add_parser("masking")
    masking.add_argument("--clients", type=_clients, default=100)
    masking.add_argument("--params", type=_params, default=1_000_000)
    masking.add_argument("--dropout", type=_fraction, default=0.1)
    masking.add_argument("--neighbors", type=_neighbors, default=None,
                         help="k for SecAgg+ (even), or 'auto'; default: the complete graph")
    masking.add_argument("--threshold", type=_positive, default=None)
    masking.add_argument("--corrupt-fraction", type=_fraction, default=0.2,
                         help="fraction of sites that may collude with the aggregator")
    masking.add_argument("--dropout-rate", type=_fraction, default=None,
                         help="expected dropout the SecAgg+ bound plans for "
                              "(default: --dropout)")
    masking.add_argument("--seed", type=_seed, default=1)
    masking.add_argument("--workers", type=_workers, default=min(2, os.cpu_count() or 1),
                         help="processes sharing mask expansion (default: cores, at most 2)")
    masking.add_argument("--json", action="store_true")
    ckks = bench_sub.add_parser("ckks")
    ckks.add_argument("--clients", type=_clients, default=100)
    ckks.add_argument("--params", type=_params, default=1_000_000)
    ckks.add_argument("--preset", default="add-only-4096")
    ckks.add_argument("--seeded", action="store_true",
                      help="sites hold the secret key: seeded symmetric ciphertexts")
    ckks.add_argument("--workers", type=_workers, default=os.cpu_count() or 1,
                      help="processes each site encrypts with (default: the CPU count); "
                           "one process is measured too")
    ckks.add_argument("--json", action="store_true")
    service = bench_sub.add_parser("service", help="a full round over mTLS on loopback")
    service.add_argument("--protocol", dest="service_protocol", choices=["masking", "ckks"],
                         default="masking")
    service.add_argument("--clients", type=_clients, default=10)
    service.add_argument("--params", type=_params, default=1_000_000)
    service.add_argument("--json", action="store_true")
    for p in (masking, ckks, service):
        p.set_defaults(func=_bench)
    from secagg.audit.cli import add_parser as add_threat_model_parser
    add_threat_model_parser(sub)
    from secagg.federation.cli import add_parser as add_federation_parser
    add_federation_parser(sub)
    from aggregator.cli import add_parser as add_aggregator_parser
    add_aggregator_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # `secagg ... | head` closed the pipe: stop quietly with the shell's status for it, as a
    # Unix command does (it printed "error: BrokenPipeError", and Python's own complaint as
    # it flushed stdout on the way out; output small enough to sit in stdout's buffer met
    # the closed pipe only then, and a closed stderr broke the error message itself)
    try:
        status = _main(argv)
        # defence: cli.output-flushed-before-exit
        sys.stdout.flush()  # (here, not at exit, where a closed pipe is a complaint)
        return status
    # defence: cli.closed-pipe-is-quiet
    except BrokenPipeError:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # (a stream with no file: nothing)
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return 141


def _one_line(text: object) -> str:
    """An error as one line: a path or value holding a line break or an escape sequence (a
    --dir of "x\nsecagg: done") printed a second line the operator read as the tool's own."""
    # defence: cli.errors-one-line
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# the extra (pyproject.toml) that installs each package a command may need beyond the core
EXTRA_OF = {"sqlalchemy": "aggregator", "alembic": "aggregator", "psycopg": "aggregator",
            "prometheus_client": "aggregator", "torch": "demo", "opacus": "demo",
            "sklearn": "demo", "matplotlib": "demo", "PIL": "demo"}


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SecAggError as e:
        print(f"secagg: error: {_one_line(e)}", file=sys.stderr)
        return 2
    # a command whose packages are an extra this install lacks (the aggregator's store on a
    # site's machine, the demo's torch on the aggregator's): which extra, not a traceback
    # defence: cli.missing-extra-named
    except ModuleNotFoundError as e:
        extra = EXTRA_OF.get((e.name or "").partition(".")[0])
        if extra is None or os.environ.get("SECAGG_DEBUG", "") not in ("", "0"):
            raise
        print(f"secagg: error: this command needs the package {e.name}, which this install "
              f"lacks: pip install 'secagg[{extra}]'", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # (for main: not the last resort's OSError below)
    # The last resort for what a command did not turn into a SecAggError itself: a path that
    # is a directory, an unreadable or truncated file, a full disk. One line naming the
    # cause, not a traceback from deep inside (SECAGG_DEBUG=1 shows it).
    # defence: cli.no-tracebacks
    except (OSError, ValueError, zipfile.BadZipFile, sqlite3.Error) as e:
        if os.environ.get("SECAGG_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:
            # (the file and the system's reason: "NotADirectoryError (m.npz): Not a
            # directory" named a Python class an operator has no use for)
            # (a rename's failure names its destination, not the temporary file renamed)
            named = e.filename2 if getattr(e, "filename2", None) else e.filename
            # defence: cli.errors-one-line-os-error-path
            print(f"secagg: error: cannot use {_one_line(named)}: {e.strerror} "
                  "(SECAGG_DEBUG=1 shows where)", file=sys.stderr)
            return 2
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        # defence: cli.errors-one-line-last-resort
        print(f"secagg: error: {type(e).__name__}{_one_line(where)}: {_one_line(reason)} "
              "(SECAGG_DEBUG=1 shows where)", file=sys.stderr)
        return 2
    # Ctrl-C: one line and the shell's status for it, not a traceback (init names a
    # directory it left half-written when it is run again)
    # defence: cli.interrupt-is-one-line
    except KeyboardInterrupt:
        if os.environ.get("SECAGG_DEBUG", "") not in ("", "0"):
            raise
        print("secagg: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # (simulate --params 10**11 asked numpy for 800 GB)
        if os.environ.get("SECAGG_DEBUG", "") not in ("", "0"):
            raise
        print("secagg: error: out of memory: the command asked for more than this machine "
              "has (fewer parameters or sites?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
