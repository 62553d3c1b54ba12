"""The HTTP server: a FastAPI app serving task pipelines, run by uvicorn.

Routes (request bodies are the pipelines' input schemas, responses their output schemas; /docs
shows both):

- `POST /v2/models/{name}/infer` for every endpoint, and its own `route` if the config gives one;
  `POST /predict` as well when there is a single endpoint.
- `GET /v2/models` lists the endpoints; `GET /v2/models/{name}` describes one and
  `GET /v2/models/{name}/ready` says whether it takes requests.
- `GET /v2/health/live` and `GET /v2/health/ready`; `GET /docs` (Swagger UI), `/redoc`, `/openapi.json`.

Invalid bodies get a 422 whose `detail` lists each problem with its location (FastAPI validates the
body against the input schema); so do inputs the pipeline rejects with a ValueError (e.g. a
`doc_stride` too large for the sequence length).

Concurrency: requests are accepted concurrently on the event loop, but each endpoint runs its
pipeline calls one at a time, on a single worker thread of its own. Numba's parallel kernels
launched from several threads at once oversubscribe the cores (each parallel region then costs far
more than it saves), so calls queue per endpoint instead; across endpoints at most `num_workers`
calls run at once (by default as many as fit in the cores at `num_cores` threads each).
"""

import asyncio
import logging
import threading
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ValidationError

from .. import __version__ as _version
from ..tasks.base import Pipeline
from .config import ConfigError, EndpointConfig, ServerConfig

__all__ = ["Endpoint", "build_app", "response_schema"]

logger = logging.getLogger("sparseinfer.server")


def response_schema(pipeline: type[Pipeline] | Pipeline) -> Any:
    """What a pipeline call returns, for the response model: the return annotation of its
    `postprocess` when that resolves (question answering returns a list for top_k > 1 or batched
    questions), else its `output_schema`."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    try:
        hint = typing.get_type_hints(cls.postprocess).get("return")
    except Exception:  # an annotation that does not resolve: fall back to the declared schema
        hint = None
    return hint if hint is not None else cls.output_schema


class Endpoint:
    """One served pipeline, its worker thread, and the routes it answers on."""

    def __init__(self, config: EndpointConfig, pipeline: Pipeline, gate: threading.BoundedSemaphore | None) -> None:
        self.config = config
        self.name: str = config.name  # type: ignore[assignment]  # ServerConfig fills in every name
        self.pipeline = pipeline
        self.routes: list[str] = []
        self._gate = gate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sparseinfer-{self.name}")

    def _call(self, request: BaseModel) -> Any:
        if self._gate is None:
            return self.pipeline(request)
        with self._gate:
            return self.pipeline(request)

    async def __call__(self, request: BaseModel) -> Any:
        """Run the pipeline on a parsed request on this endpoint's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, request)

    def describe(self, ready: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.pipeline.task,
            "model": self.config.model,
            "batch_size": self.pipeline.batch_size,
            "sequence_lengths": list(self.pipeline.sequence_lengths),
            "num_threads": self.pipeline.engine.num_threads,
            "routes": list(self.routes),
            "ready": ready,
        }

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _unprocessable(message: str) -> JSONResponse:
    """A 422 in the shape FastAPI gives for invalid bodies."""
    return JSONResponse(status_code=422, content={"detail": [{"type": "value_error", "loc": ["body"], "msg": message}]})


def _make_predict(endpoint: Endpoint) -> Callable:
    schema = endpoint.pipeline.input_schema

    async def predict(request: schema):  # type: ignore[valid-type]  # the body is the pipeline's input schema
        try:
            return await endpoint(request)
        except ValidationError as exc:  # the pipeline re-validated something the schema let through
            return JSONResponse(status_code=422, content={"detail": exc.errors(include_url=False, include_context=False)})
        except ValueError as exc:  # inputs the pipeline cannot run (e.g. doc_stride too large)
            return _unprocessable(str(exc))
        except Exception as exc:
            logger.exception("endpoint %r failed on a request", endpoint.name)
            return JSONResponse(status_code=500, content={"detail": f"{type(exc).__name__}: {exc}"})

    predict.__name__ = f"predict_{endpoint.name.replace('-', '_').replace('.', '_')}"
    return predict


def _build_endpoints(config: ServerConfig, warmup: bool) -> list[Endpoint]:
    gate = threading.BoundedSemaphore(config.workers) if config.workers < len(config.endpoints) else None
    endpoints = []
    try:
        for ec in config.endpoints:
            try:
                pipeline = Pipeline.create(ec.task, ec.model, **ec.pipeline_kwargs(config.num_cores))
                if warmup:
                    pipeline.warmup()
            except (TypeError, ValueError, FileNotFoundError, NotImplementedError) as exc:
                raise ConfigError(f"endpoint {ec.name!r}: could not create the {ec.task!r} pipeline for {ec.model!r}: {exc}") from exc
            endpoints.append(Endpoint(ec, pipeline, gate))
            logger.info("loaded %r: %r", ec.name, pipeline)
    except BaseException:
        for e in endpoints:
            e.close()
        raise
    return endpoints


def build_app(config: ServerConfig, *, warmup: bool = True) -> FastAPI:
    """The FastAPI app serving `config`'s endpoints; every pipeline is built (and, with `warmup`,
    compiled for each of its sequence lengths) before this returns. Stopping the app's lifespan
    (uvicorn's shutdown) stops the endpoints' worker threads."""
    endpoints = _build_endpoints(config, warmup)
    by_name = {e.name: e for e in endpoints}
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for e in endpoints:
                e.close()

    names = ", ".join(f"`{e.name}` ({e.pipeline.task})" for e in endpoints)
    app = FastAPI(
        title="sparseinfer server",
        version=_version,
        description=f"Task pipelines served over HTTP: {names}. POST a pipeline's input to /v2/models/<name>/infer.",
        lifespan=lifespan,
    )
    app.state.endpoints = endpoints
    app.state.config = config

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/docs")

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready():
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"ready": False})
        return {"ready": True}

    @app.get("/v2/models", tags=["models"])
    async def models() -> dict[str, list[dict[str, Any]]]:
        return {"models": [e.describe(state["ready"]) for e in endpoints]}

    single = len(endpoints) == 1
    for e in endpoints:
        predict = _make_predict(e)
        model = response_schema(e.pipeline)
        paths = [f"/v2/models/{e.name}/infer"]
        if e.config.route is not None:
            paths.append(e.config.route)
        if single and "/predict" not in paths:
            paths.append("/predict")
        for path in paths:
            app.add_api_route(
                path,
                predict,
                methods=["POST"],
                response_model=model,
                tags=[e.name],
                summary=f"{e.pipeline.task}: {e.name}",
                description=(e.pipeline.input_schema.__doc__ or f"Run the {e.pipeline.task} pipeline {e.name!r}."),
                operation_id=f"{e.name}_{path.strip('/').replace('/', '_')}",
                responses={422: {"description": "The body does not match the input schema, or the pipeline cannot run it"}},
            )
        e.routes = paths

    def _lookup(name: str) -> Endpoint:
        if name not in by_name:
            raise HTTPException(status_code=404, detail=f"no model named {name!r}; the models are: {', '.join(by_name)}")
        return by_name[name]

    @app.get("/v2/models/{name}", tags=["models"])
    async def model_metadata(name: str) -> dict[str, Any]:
        e = _lookup(name)
        return {
            **e.describe(state["ready"]),
            "platform": "sparseinfer",
            "inputs": e.pipeline.input_schema.model_json_schema(),
        }

    @app.get("/v2/models/{name}/ready", tags=["models"])
    async def model_ready(name: str):
        _lookup(name)
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"name": name, "ready": False})
        return {"name": name, "ready": True}

    # After the endpoints' own routes: an unknown model name gets a 404 that lists the models.
    @app.post("/v2/models/{name}/infer", include_in_schema=False)
    async def unknown_model(name: str):
        _lookup(name)

    return app


def run(config: ServerConfig, host: str, port: int, log_level: str = "info", warmup: bool = True) -> None:
    """Build the app and serve it with uvicorn until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    app = build_app(config, warmup=warmup)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
