"""``secagg federation ...``: set up a federation, its roster and its sites' directories."""

from __future__ import annotations

import argparse
from pathlib import Path


def _site_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected site ids like 1,2, got {text!r}") from None
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"expected site ids >= 1, got {text!r}")
    return ids


def _samples(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}")
    return value


def _rounds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text[:40]!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 1000000, got {value}")
    return value


def _site_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a site id >= 1, got {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a site id in [1, 2**63), got {text!r}")
    return value


def _init(args: argparse.Namespace) -> int:
    from secagg.errors import ConfigurationError
    from secagg.federation.kit import init_federation

    # (taken with masking, and written to the config as if it meant something there)
    if args.key_holders is not None and args.protocol != "ckks":
        raise ConfigurationError("--key-holders applies only to --protocol ckks")
    config = init_federation(args.dir, args.sites, protocol=args.protocol,
                             key_holders=args.key_holders or (1,), hosts=args.host,
                             aggregator=args.aggregator, name=args.name,
                             initial_model=args.model, max_samples=args.max_samples,
                             clip_norm=args.clip_norm, rounds=args.rounds)
    d = Path(args.dir)
    print(f"federation {args.name!r} ({args.protocol}, {args.sites} sites) written to {d}")
    print(f"  aggregator:  secagg aggregator serve --config {d / 'aggregator' / 'federation.toml'}")
    print(f"  each site:   {d / 'sites' / 'site-<id>'} (private keys 0600; hand each its own)")
    print(f"  keep offline: {d / 'ca' / 'ca.key'}, {d / 'trust-root' / 'signer.key'}")
    # (what a site pins: `csr --trust-root`, told out of band, not read from files in transit)
    print(f"  trust root:  {config.trust_root.hex()} (give it to a site that makes its own "
          "keys, out of band: csr --trust-root)")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from secagg.federation.kit import remove_site

    done = remove_site(args.dir, args.site)
    print(f"site {done.site_id} REMOVED from the roster ({len(done.sites_before)} -> "
          f"{len(done.sites_after)} sites)")
    print(f"  the re-signed roster is in {Path(args.dir) / 'roster.bin'} and the aggregator's "
          "directory; every party needs it, and the aggregator a restart")
    return 0


def _csr(args: argparse.Namespace) -> int:
    from secagg.federation.kit import make_site_request

    path = make_site_request(args.dir, args.site, trust_root=args.trust_root,
                             identity_key=args.identity)
    print(f"site {args.site}: keys written to {args.dir} (0600); send {path} to the operator")
    print(f"  pinned trust root {args.trust_root.hex()}: the files the operator sends back are "
          "taken only if they are that federation's")
    return 0


def _pin(args: argparse.Namespace) -> int:
    from secagg.federation.kit import pin_trust_root

    pin_trust_root(args.dir, args.trust_root, replace=args.replace)
    print(f"site directory {args.dir}: pinned trust root {args.trust_root.hex()}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from clients.site import check_used_before
    from secagg.federation.kit import SiteKit, install_signed_files

    def used_before(kit: SiteKit) -> None:
        check_used_before(kit, args.history_dir)

    kit = install_signed_files(args.dir, args.signed, check=used_before, key=args.key)
    print(f"installed into {args.dir}: site {kit.site_id} of federation {kit.config.name!r}, "
          f"roster version {kit.roster.version} ({len(kit.roster)} sites), job "
          f"{kit.config.job_id!r}, settings serial {kit.settings_serial}")
    return 0


def _sign_config(args: argparse.Namespace) -> int:
    from typing import Any

    from secagg.federation.config import FederationConfig
    from secagg.federation.kit import CONFIG_FILE, sign_settings

    config_path = Path(args.dir) / CONFIG_FILE

    # what was signed, said, one fact a line (read under the lock, as it was signed): every
    # site takes it, and refuses every earlier serial
    def describe(c: FederationConfig, made: Any, serial: int) -> None:
        model = c.initial_model_digest.hex()[:16] + "..." if c.initial_model_digest else "none"
        facts = [("federation", f"{c.name!r}, {c.protocol}"),
                 ("job", f"{c.job_id!r}, {c.rounds} rounds, server_learning_rate "
                         f"{c.server_learning_rate}"),
                 ("initial model", model),
                 ("update", f"clip_norm {c.clip_norm}, max_samples {c.max_samples}")]
        if made is not None:
            facts.append(("masking", f"threshold {made.reconstruction_threshold} (the config: "
                                     f"{c.threshold}), neighbors {c.neighbors}, "
                                     f"corrupt_fraction {c.corrupt_fraction}, dropout_rate "
                                     f"{c.dropout_rate}, word_bits {c.word_bits}"))
        else:
            facts.append(("ckks", f"preset {c.preset}, key holders {list(c.key_holders)}, "
                                  f"min_sites {c.min_sites or 'default'}"))
        print(f"signed the shared settings of {config_path} as serial {serial}:")
        for name, fact in facts:
            print(f"  {name + ':':15}{fact}")

    path = sign_settings(args.dir, config_path, describe=describe)
    print(f"every party needs this federation.toml and {path} (sites refuse every earlier "
          "serial from now on)")
    return 0


def _trust_root(text: str) -> bytes:
    from secagg.errors import ConfigurationError
    from secagg.federation.kit import parse_trust_root

    try:
        return parse_trust_root(text)
    except ConfigurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sign(args: argparse.Namespace) -> int:
    from secagg.federation.kit import SIGNED_FILES, sign_request

    # (the rosters before and after are this sign's, read under its lock: read here, around
    # the call, a sign racing this one made an addition look like a rotation)
    done = sign_request(args.dir, args.request, args.out, add_site=args.add_site)
    # what was approved, said: a new seat and a rotation looked alike
    if done.added:
        print(f"signed site {done.site_id}: ADDED to the roster "
              f"({len(done.sites_before)} -> {len(done.sites_after)} sites)")
    else:
        print(f"signed site {done.site_id}: a new TLS certificate, its identity key unchanged")
    print(f"  the certificate and the re-signed roster are in {done.out}; every party needs "
          "the new roster.bin")
    print(f"  the site installs {done.out} as it is ({', '.join(SIGNED_FILES)}): secagg "
          "federation install --dir SITE --from OUT")
    return 0


def _dir_path(text: str) -> Path:
    """A directory argument: an empty one (an unset "$FED_DIR") was the working directory,
    and `csr` wrote a site's private keys there."""
    # defence: federation.cli-dir-not-empty
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return Path(text)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fed = sub.add_parser("federation", help="set up a federation's keys, certificates, roster")
    fed_sub = fed.add_subparsers(dest="federation_command", required=True)
    init = fed_sub.add_parser("init", help="write a trial federation into a directory")
    init.add_argument("--dir", required=True, type=_dir_path)
    init.add_argument("--sites", required=True, type=int)
    init.add_argument("--protocol", choices=["masking", "ckks"], default="masking")
    init.add_argument("--key-holders", type=_site_ids, default=None,
                      help="CKKS: the sites that make and release the round keys, e.g. 1,2 "
                           "(default 1)")
    init.add_argument("--host", action="append", default=[],
                      help="a host name or IP the aggregator's certificate must also name")
    init.add_argument("--aggregator", default="localhost:50051", help="host:port sites dial")
    init.add_argument("--name", default="trial")
    init.add_argument("--model", type=Path, required=True,
                      help="the job's initial model (.npz of named arrays); its digest is "
                           "pinned in every site's config, so the aggregator cannot choose it")
    init.add_argument("--max-samples", type=_samples, default=10_000.0, metavar="N",
                      help="[update] max_samples: weights are samples / N; keep N near the "
                           "sites' sample counts (with weight=1 at every site: 1) "
                           "(default 10000)")
    init.add_argument("--clip-norm", type=_samples, default=1.0, metavar="C",
                      help="[update] clip_norm: each site's update (its change to the model) "
                           "goes out clipped to this L2 norm, so the round averages clipped "
                           "updates; keep it near the size of your updates (a site warns when "
                           "its update is more than twice it) (default 1.0)")
    init.add_argument("--rounds", type=_rounds, default=3, metavar="N",
                      help="[job] rounds: how many rounds the job runs (default 3)")
    init.set_defaults(func=_init)
    csr = fed_sub.add_parser("csr", help="make this site's own keys and certificate request")
    csr.add_argument("--dir", required=True, type=_dir_path)
    csr.add_argument("--site", required=True, type=_site_id)
    csr.add_argument("--identity", type=Path, default=None,
                     help="the site's existing identity.key, to rotate its certificate (the "
                          "request is signed with it; a new TLS key is made in --dir)")
    csr.add_argument("--trust-root", required=True, type=_trust_root, metavar="HEX",
                     help="the federation's trust root (64 hex digits), as its operator gave "
                          "it to you out of band: the files sent back are taken only if they "
                          "are that federation's")
    csr.set_defaults(func=_csr)
    sign_config = fed_sub.add_parser(
        "sign-config", help="sign a config's shared settings (after changing one: the job, "
                            "[update], [masking], [ckks]); sites refuse settings unsigned")
    sign_config.add_argument("--dir", required=True, type=_dir_path,
                             help="the federation directory")
    sign_config.set_defaults(func=_sign_config)
    pin = fed_sub.add_parser("pin", help="pin the federation's trust root in a site directory "
                                         "(one made before pins were kept)")
    pin.add_argument("--dir", required=True, type=_dir_path, help="the site directory")
    pin.add_argument("--trust-root", required=True, type=_trust_root, metavar="HEX",
                     help="the federation's trust root, as its operator gave it to you out of "
                          "band (never the one in the files you were sent)")
    pin.add_argument("--replace", action="store_true",
                     help="replace a pin of another trust root (a new federation's)")
    pin.set_defaults(func=_pin)
    install = fed_sub.add_parser(
        "install", help="install the files `sign` wrote (its --out, as the operator sent it) "
                        "into this site's directory, checked")
    install.add_argument("--dir", required=True, type=_dir_path, help="the site directory")
    install.add_argument("--from", dest="signed", required=True, type=_dir_path,
                         metavar="OUT", help="the directory `federation sign` wrote")
    install.add_argument("--history-dir", type=_dir_path, default=None,
                         help="the site's history directory, if Site.connect is given one")
    install.add_argument("--key", type=Path, default=None, metavar="NEW/client.key",
                         help="a rotation: the new TLS key `csr --identity` made in another "
                              "directory, installed into --dir (the site's own, with its "
                              "identity key and history) with the new certificate")
    install.set_defaults(func=_install)
    sign = fed_sub.add_parser(
        "sign", help="sign a site's request: a new certificate (with --add-site, a new seat)")
    sign.add_argument("--dir", required=True, type=_dir_path, help="the federation directory")
    sign.add_argument("--request", required=True, type=Path)
    sign.add_argument("--out", required=True, type=Path)
    sign.add_argument("--add-site", action="store_true",
                      help="the request adds a new site to the roster (confirm with it out of "
                           "band first); without it only a rotation is signed")
    sign.set_defaults(func=_sign)
    remove = fed_sub.add_parser(
        "remove-site", help="re-sign the roster without a site (its certificate is then "
                            "refused by an aggregator started with the new roster)")
    remove.add_argument("--dir", required=True, type=_dir_path, help="the federation directory")
    remove.add_argument("--site", required=True, type=_site_id)
    remove.set_defaults(func=_remove)
