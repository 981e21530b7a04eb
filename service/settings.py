"""Service settings: one class, read from `INSTANAS_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "cifar10-default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSTANAS_", frozen=True)

    model: Path = Field(default=DEFAULT_MODEL, description="Model bundle folder.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    intra_op_threads: int = Field(default=1, ge=1, description="onnxruntime threads per graph run.")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Larger requests get 413.")
    max_pixels: int = Field(default=40_000_000, ge=1, description="Larger decoded images get 413.")
    max_concurrency: int = Field(default=2, ge=1, description=(
        "Executor threads: batches classified at the same time (each thread decodes its batch's images)."))
    max_queue: int = Field(default=64, ge=0, description="Requests waiting beyond this get 503.")
    default_top_k: int = Field(default=5, ge=1)
    max_batch_size: int = Field(default=8, ge=1, description="Requests classified together in one executor run.")
    max_batch_delay_ms: float = Field(default=2.0, ge=0, description=(
        "Longest a batch that is not full waits for requests still arriving; an idle server never waits."))
    fused_cache_size: int = Field(default=32, ge=0, description=(
        "Fused whole-architecture graphs kept (least recently used dropped); 0 disables fusion."))
    fused_min_count: int = Field(default=3, ge=1, description="Images of an architecture seen before it is fused.")
    fused_builds_per_minute: float = Field(default=30, ge=0, description=(
        "Fused graphs compiled a minute at most, one at a time, off the request path (start-up warm-up excluded)."))
    log_level: str = "info"
    access_log: bool = Field(default=True, description=(
        "uvicorn's line per request (at log level info); off saves about 10% of a request's time on small models."))
