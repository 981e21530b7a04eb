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
    max_concurrency: int = Field(default=2, ge=1, description="Images classified at the same time.")
    max_queue: int = Field(default=64, ge=0, description="Requests waiting beyond this get 503.")
    default_top_k: int = Field(default=5, ge=1)
    log_level: str = "info"
