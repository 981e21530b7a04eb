"""Request and response bodies of the HTTP API, in one place."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the bundle's manifest.json, which pins every file.")


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class CellChoice(BaseModel):
    cell: int
    modules: list[str] = Field(description="Modules that ran in this cell; empty where the cell was skipped.")


class Architecture(BaseModel):
    code: str = Field(description="Reversible code of the cells x modules matrix that ran (service.architecture).")
    resolution: int = Field(description="Height = width of the input the answering network ran at.")
    network: str | None = Field(default=None, description="The bundle's network that answered (a cascade stage's); "
                                "null: the bundle's own graphs.")
    cells: list[CellChoice]
    modules_executed: int
    mflops: float = Field(description="Controller (or every cascade stage run), stem, executed modules and head, "
                          "per image.")
    estimated_latency_ms: float = Field(description="Sum of the bundle's measured batch-1 latencies of what ran "
                                        "(every cascade stage that ran).")
    relative_to_baseline: float = Field(description="estimated latency / static MobileNetV2 in the same space.")


class StageRun(BaseModel):
    network: str | None = Field(description="null: the bundle's own graphs.")
    resolution: int
    code: str = Field(description="The stage's architecture code.")
    confidence: float = Field(description="The stage's confidence in its answer (its kind: the manifest's stage; "
                              "the answer blends the previous stage's where the stage's `blend` is above 0).")
    threshold: float | None = Field(description="The image stops here when confidence >= threshold; null: last stage.")
    answered: bool


class CascadeRun(BaseModel):
    stages: list[StageRun] = Field(description="The stages that ran, in order; the last one answered.")
    escalated: bool = Field(description="More than the first stage ran.")


class Latency(BaseModel):
    decode: float = Field(description="Decoding the images of this request's batch.")
    queue: float = Field(description="Waiting while every executor was busy.")
    controller: float = Field(description="Controllers of the batch (each once, on its rows).")
    backbone: float = Field(description="Stem, selected blocks (or the fused graph) and head of the batch.")
    total: float = Field(description="The whole handler.")
    batch: float | None = Field(default=None, description="Held, with an executor free, to gather a batch.")
    batch_size: int | None = Field(default=None, description="Images classified in this request's batch.")


class OperatingPointChoice(BaseModel):
    name: str | None = Field(description="The controller that chose the architecture; null when none ran.")
    reason: str = Field(description="default, load (a faster point while requests queue), requested, budget (the most accurate point within max_latency_ms), "
                        "over_budget (none fits: the fastest), architecture (given by the request) or static.")


class ClassifyResponse(BaseModel):
    model: ModelRef
    prediction: ClassScore
    top_k: list[ClassScore]
    architecture: Architecture
    operating_point: OperatingPointChoice
    cascade: CascadeRun | None = Field(default=None, description="What a cascade operating point ran; null for others.")
    latency_ms: Latency


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    model: ModelRef | None = None
