"""Service settings: one class, read from `INSTANAS_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MODELS = Path(__file__).resolve().parent.parent / "models"  # the repository of bundles that ships with the code
DEFAULT_MODEL = MODELS / "cifar10-default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSTANAS_", frozen=True)

    model: Path = Field(default=MODELS, description=(
        "A model bundle folder, or a model repository: a folder of bundle folders, each named as its model, "
        "all served at once (service/repository.py)."))
    default_model: str | None = Field(default=None, description=(
        "In a model repository, the model of requests that name none; default: the first name in sorted order."))
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description=(
        "Server processes on the port (service/workers.py): about one core each; metrics add up across them, "
        "reloads reach all, limits hold per process."))
    reuse_port: bool = Field(default=True, description=(
        "With several workers, a listening socket each on the one port (SO_REUSEPORT: Linux spreads new "
        "connections evenly across them); false, or a platform without it: one socket they all accept from."))
    metrics_dir: Path | None = Field(default=None, description=(
        "With several workers, the folder of their metric files (emptied at start); default: a new folder on "
        "/dev/shm (a tmpfs), removed at exit."))
    intra_op_threads: int = Field(default=1, ge=1, description="onnxruntime threads per graph run.")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Larger requests get 413.")
    max_pixels: int = Field(default=40_000_000, ge=1, description="Larger decoded images get 413.")
    max_concurrency: int = Field(default=2, ge=1, description=(
        "Executor threads: batches classified at the same time (each thread decodes its batch's images that "
        "were not decoded on the event loop: see inline_max_bytes)."))
    max_queue: int = Field(default=64, ge=0, description="Requests waiting beyond this get 503.")
    default_top_k: int = Field(default=5, ge=1)
    max_batch_size: int = Field(default=8, ge=1, description=(
        "Images classified together in one executor run; a request's images are never split."))
    max_batch_delay_ms: float = Field(default=2.0, ge=0, description=(
        "Longest a batch that is not full waits for requests still arriving; an idle server never waits."))
    inline_max_bytes: int = Field(default=64 * 1024, ge=0, description=(
        "A server handling one request only classifies it on the event loop's thread, without the two thread "
        "hand-offs (service/batching.py), when its images total at most this many bytes and 1 Mpixel; and "
        "a request's images are decoded on the event loop's thread, not the executor's, when they are plain "
        "JPEGs (sequential, no metadata but JFIF's) totalling at most this many bytes and 65,536 pixels "
        "(service/classification.py); "
        "0: neither."))
    fused_cache_size: int = Field(default=32, ge=0, description=(
        "Fused whole-architecture graphs kept (least recently used dropped); 0 disables fusion."))
    fused_min_count: int = Field(default=3, ge=1, description="Images of an architecture seen before it is fused.")
    fused_builds_per_minute: float = Field(default=30, ge=0, description=(
        "Fused graphs compiled a minute at most, one at a time, off the request path (start-up warm-up excluded)."))
    queue_target_ms: float = Field(default=20.0, ge=0, description=(
        "Recent queue time above which requests without options move to faster operating points, "
        "and back once it falls below a quarter of it; 0 keeps the default point always."))
    load_cooldown_s: float = Field(default=1.0, ge=0, description="Least time between two operating-point moves.")
    max_images_per_request: int = Field(default=32, ge=1, description=(
        "Images one request may carry (/classify, /v2 infer); more get 413 too_many_images."))
    log_level: str = "info"
    log_format: Literal["json", "text"] = Field(default="json", description=(
        "json: one JSON object a log line (the access log included); text: plain lines."))
    access_log: bool = Field(default=True, description=(
        "The access log line per request (service/logs.py, at log level info; it replaces uvicorn's); "
        "off saves about 10% of a request's time on small models."))
    # Hostile clients, overload, shutdown (service/limits.py, service/server.py; docs/CONFIGURATION.md, "Limits").
    max_buffered_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description=(
        "Request body bytes held at once across all requests; a body that would pass it is refused "
        "at once (503 buffer_full) before it is read."))
    body_timeout: float = Field(default=30.0, ge=0, description=(
        "Seconds a request's whole body may take to arrive, from the handler's first read (408); 0: no limit."))
    header_timeout: float = Field(default=10.0, gt=0, description=(
        "Seconds the request line and headers may take, from the connection opening or the next "
        "request's first byte (408, connection closed)."))
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="Larger request line and headers get 431.")
    keep_alive_timeout: float = Field(default=5.0, gt=0, description="Seconds an idle keep-alive connection is kept.")
    keep_alive_max_requests: int = Field(default=1000, ge=1, description=(
        "Requests on one connection, after which the response closes it."))
    max_connections: int = Field(default=1024, ge=1, description=(
        "Open client connections (lowered to the open-files limit less 64); a new one beyond it closes the "
        "longest-idle connection, or gets 503 when every connection is busy."))
    drain_seconds: float = Field(default=5.0, ge=0, description=(
        "On SIGTERM, seconds readiness answers 503 while requests are still served, before shutting down."))
    shutdown_timeout: float = Field(default=15.0, ge=0, description=(
        "Seconds requests in flight may take to finish at shutdown (after the drain) before they are cancelled."))
    api_token: SecretStr | None = Field(default=None, description=(
        "Bearer token required by /model, /metrics and /admin/* (401 otherwise); unset: no check."))
    cors_origins: str = Field(default="", description=(
        "Comma-separated origins allowed to call the API from a browser (CORS), or *; empty: CORS off."))
    demo_gallery: Path | None = Field(default=None, description=(
        "A folder of images for the demo page's gallery (GET /demo/gallery; searched recursively, sorted by "
        "path); default: the CIFAR-10 samples shipped with the page."))
    demo_gallery_limit: int = Field(default=48, ge=1, le=1000, description="Gallery images classified at most.")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
