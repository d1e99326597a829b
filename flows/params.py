"""Flow parameters: pydantic models with bounds and descriptions.

Prefect validates them (a bad value is refused before a run starts) and renders them
as forms in its UI; MLflow logs them whole (flows.tracking.runs.flatten), under the same
names in every run, so the UI's compare view lines runs up field by field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.tracking.registry import PromotionRule
from flows.settings import DEMO_DATA_DIR, WORK_DIR
from hierloc.model.model import ModelConfig
from hierloc.train.loop import TrainConfig


class DemoDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    build_if_missing: bool = Field(True, description="build the embedded 'Earth tiles' data when data_dir holds no "
                                                     "dataset and is the project's demo folder, or empty or absent")
    n_train: int = Field(20_000, ge=10, le=2_000_000)
    n_test: int = Field(2_000, ge=10, le=500_000)
    seed: int = Field(0, ge=0)
    heldout_km: float | None = Field(None, ge=0.0, le=5_000.0, description="None: test rows drawn at random among all "
                                     "points; R: place-level held-out split, every test row at least R km from every "
                                     "training row (issue 16 uses 25; never in the default demo folder)")


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verify_images: Literal["none", "exists", "decode"] = Field("decode", description="how far to check each image")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail the run above this quarantined share")
    layout: Literal["auto", "csv", "webdataset"] = Field(
        "auto", description="csv: {split}.csv + images/{split}/ shards; webdataset: {split}/*.tar with jpg/json/npy")
    incremental: bool = Field(True, description="re-runs read only new CSV bytes and new shards (content hashes)")


class HierarchyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeler: Literal["osv5m", "geonames", "polygons"] = Field(
        "osv5m", description="osv5m: the dataset's labels; geonames: nearest GeoNames place (= reverse_geocoder); "
                             "polygons: admin polygons (point in polygon, Dask-parallel)")
    coords: Literal["geonames", "mean", "medoid", "representative"] = Field(
        "geonames", description="entity coordinates: GeoNames place for cities (upper levels: image mean), image mean, "
                                "image medoid, or polygon representative point (polygons only)")
    admin_source: Literal["gazetteer", "gadm", "geoboundaries", "natural_earth", "parquet"] = Field(
        "gazetteer", description="polygons: embedded geoBoundaries units (gazetteer), or your GADM / geoBoundaries / "
                                 "Natural Earth files, or a prepared GeoParquet table, at admin_path")
    admin_path: str | None = Field(None, description="polygon file or folder for gadm / geoboundaries / natural_earth")
    grid_deg: float = Field(5.0, ge=0.0, le=360.0, description="cut polygons on this grid (0 = no cut): faster joins")
    max_snap_km: float = Field(25.0, ge=0.0, le=500.0, description="points in no polygon go to the nearest within this")
    check_all_levels: bool = Field(False, description="look every point up at every level, to count every "
                                                      "disagreement between levels (slower; same labels)")
    @field_validator("grid_deg")
    @classmethod
    def _grid(cls, v: float) -> float:
        if 0 < v < 0.1:
            raise ValueError("grid_deg: 0 (no cut) or at least 0.1 degree")
        return v

    dask_scheduler: str | None = Field(None, description="Dask scheduler address (tcp://...) for a real cluster; "
                                                         "None: a LocalCluster for big inputs, in-process for small ones; 'sync'")


class FeatureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(
        "fixed:pixelstats",
        pattern=r"^(fixed:pixelstats|open_clip:[\w\-/.@]+|timm:[\w\-.]+|precomputed:[A-Za-z0-9_][A-Za-z0-9_.-]*)$",
        description="fixed:pixelstats, open_clip:<arch or config.json>, timm:<model>, precomputed:<name> "
                    "(the WebDataset copy's features, written by the ingest)")
    pretrained: str | None = Field(None, description="local weights file (or open_clip tag with network); None = random init")
    batch_size: int = Field(256, ge=1, le=65_536)
    num_workers: int = Field(2, ge=0, le=64)
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="autocast on CUDA; the CPU computes fp32")
    shard_size: int = Field(8192, ge=1, le=1_000_000, description="images per cache shard (at most this much work is "
                                                                 "lost on a kill)")
    retry_failed: bool = Field(False, description="read images that failed in an earlier run again")
    fast_decode: bool = Field(True, description="decode JPEGs at 1/2, 1/4 or 1/8 scale where the backbone resizes to "
                                                "less (2.3x faster per core; features within the resize tolerance, "
                                                "hierloc.features.decode); false: full decode, today's exact features")
    decoder: Literal["pil", "device"] = Field("pil", description="where JPEGs are decoded: pil (in the DataLoader "
                                              "workers) or device (workers read bytes; torchvision's decode_jpeg on "
                                              "the device, nvjpeg on CUDA; hierloc.features.device_decode; its own "
                                              "cache key)")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail the stage when more of a split's images "
                                                                     "cannot be read (a wrong root, a broken backbone)")


class TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Text_i: the open_clip text tower on each entity's name and its parents' "
                                             "names (HIERLOC.md section 4). Offline the tower is random-init: give "
                                             "real weights in 'pretrained' for meaningful text features")
    spec: str = Field("open_clip:ViT-B-32", pattern=r"^open_clip:[\w\-/.@]+$", description="open_clip text tower")
    pretrained: str | None = Field(None, description="local open_clip/CLIP checkpoint file; None = random init (seeded)")
    batch_size: int = Field(256, ge=1, le=65_536)


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["hierloc", "retrieval"] = Field(
        "hierloc", description="hierloc: train the model and beam-search it; retrieval: the paper's baseline, the "
                               "location of the nearest training image by backbone feature (no training)")
    beam_k: int = Field(10, ge=1, le=10_000, description="beam width (paper: 10)")
    variant: Literal["official", "corrected"] = Field("official", description="OSV-5M metric variant (see docs/metrics.md)")


class RegistryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="register the trained model in the MLflow model registry")
    name: str = Field("hierloc", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="registered model name")
    rule: PromotionRule = Field(PromotionRule(), description="when the candidate takes the 'champion' alias")


class UpstreamRuns(BaseModel):
    """Run ids of earlier stages, for running one stage alone; None = the newest finished
    run of that stage in the experiment."""

    model_config = ConfigDict(extra="forbid")
    ingest: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    hierarchy: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    features: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    train: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")


class RetrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_champion: bool = Field(True, description="fine-tune from the registered champion (else train from scratch)")
    epochs: int = Field(3, ge=1, le=1000, description="fine-tuning epochs (replaces train.epochs)")


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs; the defaults run the embedded demo."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str = Field(str(DEMO_DATA_DIR), description="an OSV-5M release folder (train.csv, test.csv, images/)")
    work_dir: str = Field(str(WORK_DIR), description="where the stages write their outputs")
    experiment: str = Field("hierloc", min_length=1, description="MLflow experiment name")
    demo_data: DemoDataParams = DemoDataParams()
    ingest: IngestParams = IngestParams()
    hierarchy: HierarchyParams = HierarchyParams()
    features: FeatureParams = FeatureParams()
    text: TextParams = TextParams()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalParams = EvalParams()
    registry: RegistryParams = RegistryParams()
