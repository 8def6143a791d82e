"""`leancnn serve ZOO`: the deadline-aware inference server."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..errors import LeancnnError
from ..measure.latency import parse_quantile
from ..zoo.build import load_manifest
from .base import Command, register_command

TOKEN_VARIABLE = "LEANCNN_SERVE_TOKEN"   # the bearer token, when no --token-file is given

try:  # the serve extra is optional: without it, `leancnn serve` says how to get it
    from ..serve.app import create_app
    from ..serve.run import run_server
    MISSING = None
except ImportError as missing:
    MISSING = missing.name


@register_command
class Serve(Command):
    name = "serve"
    help = "serve a zoo over HTTP, picking per request the best model for its deadline"
    description = ("POST /predict (PNG, JPEG, .npy or raw uint8 body, or JSON with base64 'image' and 'deadline_ms'; "
                   "deadline in X-Deadline-Ms or ?deadline_ms=), GET /health, GET /metrics. A worker that "
                   "dies is replaced within a second (forked from a fork server holding the loaded zoo); SIGTERM drains (new requests 503, held ones "
                   f"answered) and exits 0. With a token ({TOKEN_VARIABLE} or --token-file), /predict and /metrics "
                   "need 'Authorization: Bearer TOKEN'.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("zoo", help="zoo directory (leancnn zoo build)")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--when-nothing-fits", default="fastest", choices=["fastest", "refuse"],
                            help="answer with the fastest model and mark the deadline missed, or refuse "
                                 "(default fastest)")
        parser.add_argument("--static", choices=["fastest", "most-accurate"], default=None,
                            help="always use one model (the baselines the adaptive policy is compared with)")
        parser.add_argument("--max-pending", type=int, default=32, help="requests allowed to wait; more get 503")
        parser.add_argument("--max-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
        parser.add_argument("--threads", type=int, default=1, help="torch threads for inference (default 1)")
        parser.add_argument("--quantile", default="p99",
                            help="quantile of each model's measured times the plan uses (median, pNN or a "
                                 "fraction): about the share of deadlines it aims to meet (default p99)")
        parser.add_argument("--blocking-risk", type=float, default=0.02,
                            help="longest model run allowed: the one expected to make at most this many later "
                                 "requests late, from the recent arrival rate and deadlines (default 0.02; 0 turns "
                                 "it off)")
        parser.add_argument("--inference-cpus", default=None, metavar="LIST",
                            help="CPU ids for the inference process, e.g. '1' or '2,3'; the event loop keeps to the "
                                 "others (default: no pinning)")
        parser.add_argument("--token-file", default=None, metavar="PATH",
                            help=f"file holding the bearer token /predict and /metrics require (default: "
                                 f"${TOKEN_VARIABLE} if set, else no token)")
        parser.add_argument("--drain-s", type=float, default=2.0,
                            help="on SIGTERM, longest wait for held requests before the rest get 503 (default 2)")
        parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")

    def run(self, args: argparse.Namespace) -> int:
        if MISSING:
            raise LeancnnError(f"serving needs the serve extra: pip install -e '.[serve]' ({MISSING} is missing)")
        load_manifest(Path(args.zoo))   # a bad zoo fails here, in one line, before the worker starts
        plan_quantile = parse_quantile(args.quantile, "--quantile")
        if not 0 <= args.blocking_risk < 1:
            raise LeancnnError(f"--blocking-risk must be in [0, 1) (0 turns it off), got {args.blocking_risk}")
        if not args.drain_s >= 0:
            raise LeancnnError(f"--drain-s must be 0 or more seconds, got {args.drain_s}")
        token = read_token(args.token_file)
        if token is None and not is_loopback(args.host):
            print(f"warning: serving on {args.host} without a token: anyone who can reach it can use /predict "
                  f"and read /metrics (set {TOKEN_VARIABLE} or --token-file)", file=sys.stderr, flush=True)
        app = create_app(args.zoo, policy=args.when_nothing_fits, fixed=args.static, threads=args.threads,
                         plan_quantile=plan_quantile,
                         blocking_risk=args.blocking_risk or None, inference_cpus=parse_cpus(args.inference_cpus),
                         token=token, max_pending=args.max_pending, max_bytes=args.max_bytes)
        supervisor = app.state.supervisor
        print(f"serving {len(supervisor.names)} models from {args.zoo} on http://{args.host}:{args.port} "
              f"(inference in process {supervisor.active.pid}, forked from {supervisor.fork_server.pid}; hand-back overhead "
              f"{supervisor.active.overhead_ms():.3f} ms, measured as it serves"
              f"{'; bearer token required' if token else ''})", flush=True)
        run_server(app, args.host, args.port, log_level=args.log_level, drain_s=args.drain_s)
        return 0


def read_token(path: str | None) -> str | None:
    """The bearer token from --token-file (first line, surrounding spaces dropped) or the environment."""
    if path is None:
        return os.environ.get(TOKEN_VARIABLE) or None
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise LeancnnError(f"--token-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LeancnnError(f"--token-file {path} cannot be read as text: {error}") from None
    if not token or "\n" in token:
        raise LeancnnError(f"--token-file {path} must hold one non-empty line (the token)")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cpus(text: str | None) -> list[int] | None:
    """'1' or '2,3' -> CPU ids this process may use; one clear line otherwise."""
    if not text:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    try:
        cpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise LeancnnError(f"--inference-cpus must be CPU ids separated by commas, got {text!r}") from None
    unknown = [c for c in cpus if c not in allowed]
    if unknown:
        raise LeancnnError(f"--inference-cpus names CPU(s) {unknown} this process cannot use; allowed: {allowed}")
    return cpus
