"""HTTP server for the task pipelines (FastAPI + uvicorn; `pip install 'sparseinfer[server]'`).

    sparseinfer serve --task sentiment-analysis --model-path ./model [--host 127.0.0.1] [--port 5543]
    sparseinfer serve --config-file server.yaml

The config file has DeepSparse's layout (see `sparseinfer.server.config`). In Python,
`build_app(ServerConfig...)` gives the FastAPI app; `sparseinfer.server.app` describes the routes.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from typing import Any

from .config import DEFAULT_HOST, DEFAULT_PORT, ConfigError, EndpointConfig, ServerConfig, load_config

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ConfigError",
    "EndpointConfig",
    "ServerConfig",
    "build_app",
    "cli_main",
    "load_config",
    "serve",
    "serve_parser",
]

_MISSING_EXTRA = "the server needs FastAPI and uvicorn: pip install 'sparseinfer[server]'"


def build_app(config: ServerConfig, *, warmup: bool = True):
    """The FastAPI app serving `config` (see `sparseinfer.server.app.build_app`)."""
    from .app import build_app as _build_app

    return _build_app(config, warmup=warmup)


def serve(config: ServerConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info", warmup: bool = True) -> None:
    """Serve `config` with uvicorn until interrupted."""
    from .app import run

    run(config, host=host, port=port, log_level=log_level, warmup=warmup)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparseinfer serve",
        description="Serve task pipelines over HTTP. Give --task and --model-path for one endpoint, or --config-file for several.",
        epilog=(
            "Routes: POST /predict (one endpoint), POST /v2/models/<name>/infer, GET /v2/models, GET /v2/health/ready, "
            "GET /docs. The config file has DeepSparse's layout: endpoints: [{task, model, name, route, batch_size, "
            "bucketing: {sequence_lengths: [...]}, kwargs: {...}}], num_cores, num_workers."
        ),
    )
    src = p.add_argument_group("what to serve")
    src.add_argument("--task", help="task name or alias: question-answering (qa), text-classification (sentiment-analysis), ...")
    src.add_argument(
        "--model-path", "--model_path", "--model", dest="model_path", help="directory with model.onnx, tokenizer.json, config.json"
    )
    src.add_argument("--config-file", "--config_file", dest="config_file", help="YAML server config (DeepSparse layout)")
    opt = p.add_argument_group("endpoint options (with --task)")
    opt.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1, help="batch size to compile for (default 1)")
    opt.add_argument(
        "--sequence-length",
        "--sequence_length",
        dest="sequence_length",
        type=int,
        nargs="+",
        help="sequence length(s) to compile for (default: the pipeline's)",
    )
    opt.add_argument("--name", help="model name in /v2/models/<name>/infer (default <task>-0)")
    opt.add_argument("--route", help="an extra route for the endpoint besides /predict")
    opt.add_argument("--kwargs", dest="task_kwargs", help="more pipeline options as JSON, e.g. '{\"top_k\": 2}'")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default=None, help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes the server to the network)")
    srv.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    srv.add_argument("--num-cores", "--num_cores", dest="num_cores", type=int, help="threads per pipeline call (default: all cores)")
    srv.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, help="pipeline calls at once across endpoints")
    srv.add_argument(
        "--log-level", "--log_level", dest="log_level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    srv.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="compile each sequence length on first use instead of at start"
    )
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerConfig:
    """The ServerConfig the parsed `serve` flags describe (parser.error on conflicting flags)."""
    if args.config_file and args.task:
        parser.error("give either --config-file or --task/--model-path, not both")
    if args.config_file:
        endpoint_flags = {"--model-path": args.model_path, "--sequence-length": args.sequence_length, "--name": args.name}
        endpoint_flags.update({"--route": args.route, "--kwargs": args.task_kwargs})
        given = [flag for flag, value in endpoint_flags.items() if value is not None]
        if args.batch_size != 1:
            given.append("--batch-size")
        if given:
            parser.error(f"{', '.join(given)} apply to --task; with --config-file, set them in the file's endpoints")
        config = load_config(args.config_file)
        overrides = {k: v for k, v in (("num_cores", args.num_cores), ("num_workers", args.num_workers)) if v is not None}
        if overrides:
            config = ServerConfig.from_dict({**config.model_dump(exclude_none=True), **overrides}, source="server options")
        return config
    if not args.task:
        parser.error("give --task and --model-path (one endpoint), or --config-file")
    kwargs: dict[str, Any] = {}
    if args.task_kwargs:
        try:
            kwargs = json.loads(args.task_kwargs)
        except json.JSONDecodeError as exc:
            parser.error(f"--kwargs must be a JSON object: {exc}")
        if not isinstance(kwargs, dict):
            parser.error(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    return ServerConfig.for_task(
        args.task,
        args.model_path,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        num_cores=args.num_cores,
        num_workers=args.num_workers,
        name=args.name,
        route=args.route,
        kwargs=kwargs,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cli_main(argv: list[str]) -> int:
    """`sparseinfer serve ...`: parse the flags, load the pipelines, serve until interrupted.
    Returns the process exit code (2 for bad flags or a bad config)."""
    argv = list(argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = serve_parser()
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(f"sparseinfer serve: {_MISSING_EXTRA}", file=sys.stderr)
        return 1
    host = args.host or DEFAULT_HOST
    port = DEFAULT_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    try:
        config = config_from_args(args, parser)
        from .app import build_app as _build_app

        app = _build_app(config, warmup=args.warmup)
    except ConfigError as exc:
        print(f"sparseinfer serve: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(host):
        logging.getLogger("sparseinfer.server").warning(
            "listening on %s: the server has no authentication; anyone who can reach this address can run the models", host
        )
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=args.log_level, workers=1)
    return 0
