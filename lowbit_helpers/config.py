"""The params schema: one typed object, validated once; errors name the key.

A params YAML holds only the keys below; an unknown key or a value of the wrong type is
refused with the dotted key path, what was found, and how to fix it. Relative paths are
resolved against the directory the command is started from (the repository root in the
README's commands) and written back absolute into the run directory's ``params.yaml``,
which is what the notebooks read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import LowbitError
from .formats import FORMATS
from .int8 import ALL_BIAS_CORRECTIONS, ALL_METHODS, BACKENDS, HEAD_POLICIES, Int8Options, checked, option_specs
from .int8.bias_correction import BC_IMAGES
from .lowbit import DEFAULT_METHOD, method_grammar, parse_method
from .runtime import ENGINES, RUNTIMES
from .schema import DecodeCfg, Section
from .sensitivity.metrics import METRICS
from .sensitivity.sweep import DIRECTIONS


def one_of(names) -> Any:
    """A Literal type of the registered ``names``: the params schema's choices are the registries'."""
    return Literal[tuple(names)]


class ModelCfg(Section):
    weights: str = Field(
        "yolov10n",
        description="yolov10{n,s,m,b,l,x} | path/to/model.pt | path/to/model.onnx | random:yolov10{n,..,x}",
    )
    imgsz: Literal[640] = 640
    opset: int = Field(19, ge=19, le=23, description="ONNX opset of the export; ModelOpt INT8/FP8 need >= 19")


class DataCfg(Section):
    coco_root: str = "../shared/coco2017"
    annotations: str = Field("annotations/instances_val2017_val1300.json", description="relative to coco_root")
    subset: str = Field("val100", description="val100 | val500 (<root>/<name>_ids.txt) | first:N | all | ids.txt path")
    calib_list: str = Field("calib160.txt", description="image paths, one per line, relative to the list's folder")
    calib_images: int = Field(128, ge=1)


class EvaluationCfg(Section):
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over images for the 95% intervals")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0


class RuntimeCfg(Section):
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = Field(2, ge=1, description="ORT intra-op threads")


class LatencyCfg(Section):
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    profile_runs: int = Field(5, ge=0, description="runs per model under ORT's profiler (0: none): where the time goes")


class ParityCfg(Section):
    enabled: bool = True
    subset: str = "val100"
    ultralytics_pt: bool = Field(True, description="also score Ultralytics predicting from the .pt")


class Int8Variant(Section):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    backend: one_of(BACKENDS)
    method: one_of(ALL_METHODS) = Field(..., description="one of the backend's methods (int8/<backend>.py)")
    head_policy: one_of(HEAD_POLICIES) = "conservative"
    keep_sensitive: int = Field(0, ge=0, description="also exclude the N Convs with the largest w8a8 kept gain (the lowest "
                                "alone metric where the kept direction is not swept; notebook 04's sweep, computed on first need) from quantization")
    reduce_range: bool = Field(False, description="ort: 7-bit weights (no int16 saturation without VNNI)")
    bias_correction: one_of(ALL_BIAS_CORRECTIONS) | None = Field(
        None, description="nncf: its own, full (default) | fast; ort: fast (default) | none; modelopt: none (default) | fast "
        "(int8/bias_correction.py on the finished Q/DQ file)")
    placement: one_of(option_specs()["placement"].choices) = Field(
        "all", description="ort: Q/DQ on every op ORT quantizes, or on Conv inputs only")
    activations: one_of(option_specs()["activations"].choices) = Field(
        "uint8", description="ort: uint8 asymmetric (the CPU's kernels) or int8-symmetric (what TensorRT takes)")
    format: one_of(option_specs()["format"].choices) = Field(
        "onnx", description="nncf: a Q/DQ ONNX, or an OpenVINO IR (OpenVINO only)")
    engines: list[one_of(ENGINES)] | None = Field(
        None, description="the engines this recipe is scored under (null: int8.engines), e.g. only ort-exact for a "
        "TensorRT recipe, whose ORT kernel and OpenVINO numbers no answer reads")

    def options(self) -> Int8Options:
        """This variant's own options (the int8 section's shared ones are added by notebook 03)."""
        return Int8Options(method=self.method, head_policy=self.head_policy, bias_correction=self.bias_correction,
                           reduce_range=self.reduce_range, placement=self.placement, activations=self.activations,
                           format=self.format)  # fmt: skip

    @model_validator(mode="after")
    def _backend_rules(self):
        try:  # the backend's own rules (int8/base.py: check_options), the same as the command line's
            checked(self.backend, self.options(), self.name)
        except LowbitError as exc:
            raise ValueError(f"{exc.cause}; {exc.fix}") from None
        return self


def _default_variants() -> list[Int8Variant]:
    """The default run's recipes: the ORT CPU recipe, the best NNCF row and the two TensorRT-ready files
    (ModelOpt's and ours), each the best on val500 of its kind among params/full.yaml's recipes
    (measured so on 2026-12-08: the issue note on INT8 that holds), re-measured in every default run."""
    return [
        Int8Variant(name="ort-percentile-bc", backend="ort", method="percentile", bias_correction="fast"),
        Int8Variant(name="nncf-mixed", backend="nncf", method="mixed", bias_correction="full", engines=["openvino"]),
        Int8Variant(name="modelopt-entropy", backend="modelopt", method="entropy", engines=["ort-exact"]),
        Int8Variant(name="ort-trt-bc-keep16", backend="ort", method="avgminmax", placement="conv-inputs",
                    activations="int8-symmetric", bias_correction="fast", keep_sensitive=16, engines=["ort-exact", "openvino"]),
    ]


Engine = one_of(ENGINES)


EMULATE_DEFAULT = ["ort-avgminmax", "ort-avgminmax-rr", "ort-avgminmax-keep6"]


class EmulateCfg(Section):
    """ORT's kernels on another x86 CPU model, emulated by QEMU user mode (its CPUID and its instructions)."""

    cpu: str | None = Field(None, description="QEMU CPU model (Haswell: AVX2 + FMA, no AVX-512 / VNNI); null: off")
    subset: str = "val100"
    variants: list[str] = Field(default_factory=lambda: list(EMULATE_DEFAULT),
                                description="INT8 variants run there (ORT kernels); the default's names may be absent")


class Int8Cfg(Section):
    enabled: bool = True
    variants: list[Int8Variant] = Field(default_factory=_default_variants)
    calib_images: int | None = Field(None, ge=1, description="default: data.calib_images")
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names kept in float (all variants)")
    exclude_op_types: list[str] = Field(default_factory=list, description="ModelOpt: op types kept in float")
    percentile: float = Field(99.999, gt=90.0, le=100.0)
    calibration_eps: list[str] = Field(default_factory=lambda: ["cpu"], description="ModelOpt: cpu | cuda:0 | trt")
    high_precision_dtype: one_of(option_specs()["high_precision_dtype"].choices) = "fp32"
    select_subset: str = Field("val500", description="recipes are chosen on these images ...")
    confirm_subset: str = Field("val1300", description="... and confirmed on these minus select_subset (extra800)")
    engines: list[Engine] = Field(default_factory=lambda: ["ort", "ort-exact", "openvino"],
                                  description="each variant's accuracy under each (the first is ORT's kernels)")
    confirm_engines: list[Engine] | None = Field(default_factory=lambda: ["ort", "ort-exact", "openvino"], description="the engines (of engines) also run on the "
                                                 "confirmation split; null: all of them")
    fp32_engines: list[Engine] = Field(default_factory=list,
                                       description="FP32 rows under other engines (bf16 skipped where the CPU lacks it)")
    latency_runtimes: list[one_of(RUNTIMES)] = Field(default_factory=lambda: ["ort", "openvino"],
                                                               description="notebooks 03 and 05 time every model under each (05: "
                                                               "each file OpenVINO compiles); must hold ort: ORT FP32 is every ratio's reference")

    openvino_settings: dict[str, dict[str, str | int | float | bool]] = Field(
        default_factory=lambda: {"bf16": {"INFERENCE_PRECISION_HINT": "bf16"}, "denormals": {"CPU_DENORMALS_OPTIMIZATION": True},
                                 "unpinned": {"ENABLE_CPU_PINNING": False}}, description="OpenVINO CPU properties over this project's settings (LATENCY hint, one stream, "
        "f32, runtime.threads), each timed beside them on every variant OpenVINO scores (notebook 03's settings bench)")

    @field_validator("openvino_settings")
    @classmethod
    def _settings_named(cls, v: dict) -> dict:
        if "default" in v:
            raise ValueError("'default' names this project's own OpenVINO settings (the rows without a setting): "
                             "give the setting another name")  # fmt: skip
        if any(not props for props in v.values()):
            raise ValueError("a setting with no property is the default itself: give each setting a property")
        return v

    @field_validator("confirm_engines")
    @classmethod
    def _answer_engines_confirmed(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not {"ort", "ort-exact"} <= set(v):
            raise ValueError("must include ort and ort-exact: the answer's CPU and TensorRT rows are confirmed "
                             "with them (or null: every engine)")  # fmt: skip
        return v

    @field_validator("latency_runtimes")
    @classmethod
    def _ort_timed(cls, v: list[str]) -> list[str]:
        if "ort" not in v:
            raise ValueError("must include ort: every latency ratio is to ORT's FP32 (add ort to the list)")
        return v
    emulate: EmulateCfg = Field(default_factory=EmulateCfg)
    fidelity_images: int = Field(16, ge=1, description="evaluation images for the raw-head SQNR / cosine")
    bias_correction_images: int = Field(BC_IMAGES, ge=1, description="calibration images [0, N) for the statistics of "
                                        "bias_correction: fast on ort / modelopt variants")


Fmt = one_of(FORMATS)


Metric = one_of(METRICS)


class ValidationCfg(Section):
    enabled: bool = Field(False, description="run the metric validation (dozens of COCO evaluations; "
                                             "`python -m lowbit_helpers validate-sensitivity PARAMS` runs it alone)")
    formats: list[Fmt] = Field(default_factory=lambda: ["w4a16", "w4a8"], description="alone direction, each format")
    method: str = Field(DEFAULT_METHOD, description="4-bit weight PTQ of the perturbations (a lowbit.METHODS name)")
    layers: int = Field(24, ge=3, description="layers per format: the `top` most sensitive by each candidate metric, "
                                              "the rest spread evenly over the ranking")
    top: int = Field(4, ge=0, description="see layers")
    kept_format: Fmt | None = Field("w4a16", description="the kept direction (all but one layer) in this format; null: none")
    kept_layers: int = Field(12, ge=0, description="layers of the kept direction (the 2 most sensitive by each metric, then spread)")
    subset: str = Field("val500", description="ground truth: COCO mAP on these images ...")
    select_subset: str = Field("val100", description="... the metric is chosen on this part and confirmed on the rest")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _check_method(v)

    @field_validator("formats", "kept_format")
    @classmethod
    def _materialisable(cls, v):
        if v == "w8a8-ort" or (isinstance(v, list) and "w8a8-ort" in v):
            raise ValueError("the validation perturbs layers as notebook 05 deploys them: use w4a16, w4a8, w8a8 or fp8")
        return v


class SensitivityCfg(Section):
    enabled: bool = True
    formats: list[Fmt] = Field(default_factory=lambda: ["w8a8", "w4a8"])
    directions: list[one_of(DIRECTIONS)] = Field(default_factory=lambda: ["alone"], description="alone: only the layer in the "
                                                  "format; kept: all but the layer (full.yaml: the validation finds no metric that predicts it)")
    rank_as: dict[Fmt, Fmt] = Field(default_factory=lambda: {"w4a16": "w4a8"}, description="formats not swept whose top-K schemes take "
                                    "another swept format's ranking, e.g. {w4a16: w4a8} (they rank alike)")
    metric: Metric = Field("det_sqnr", description="the metric that ranks layers (schemes, keep_sensitive)")
    range_images: int = Field(32, ge=1, description="calibration images [0, R) for the activation ranges")
    images: int = Field(32, ge=1, description="sweep images: calibration images [R, R+N), evaluation-disjoint")
    workers: int = Field(2, ge=1, description="sweep processes (one ORT thread each)")
    group: int = Field(32, ge=1, description="perturbations whose sub-graph sessions live at once per worker (bounds memory)")
    chunk: int = Field(8, ge=1, description="images per batch of the Torch proxy")
    naive_check: int = Field(2, ge=0, description="Convs per format also computed naively (equality + naive cost)")
    validation: ValidationCfg = ValidationCfg()
    proxy: bool = Field(False, description="the plan's Torch proxy sweep (alone, proxy_format) and its transfer")
    proxy_format: Fmt = "w4a8"
    top_k: list[int] = Field(default_factory=lambda: [0, 10])
    budgets: list[float] = Field(default_factory=lambda: [50.0, 75.0])
    budget_low: Fmt = "w4a8"
    budget_high: Fmt = "w8a8"

    @model_validator(mode="after")
    def _ranked_from_a_sweep(self):
        # entries whose source is not swept are ignored (sensitivity/schemes.py), so that the default
        # {w4a16: w4a8} holds with any format list; ORT's own file ranks nothing here
        if any("w8a8-ort" in (fmt, source) for fmt, source in self.rank_as.items()):
            raise ValueError("rank_as: w8a8-ort is ORT's own INT8 file, neither a scheme format nor its ranking")
        return self

    @field_validator("budget_low", "budget_high", "proxy_format")
    @classmethod
    def _deployable(cls, v: str) -> str:
        if v == "w8a8-ort":
            raise ValueError("w8a8-ort is ORT's own INT8 file (notebook 03), not a scheme or proxy format: use w8a8")
        return v


def _default_ladder() -> list[str]:
    """The full study's best method alone (params/full.yaml measures every rung, round to nearest to AdaRound)."""
    return ["gptq-bc-b32"]


class ReconstructionCfg(Section):
    iterations: list[int] = Field(default_factory=lambda: [0], min_length=1,
                                  description="integer-kernel forms per scheme: 0 keeps the method's codes; N > 0 learns them by "
                                  "block reconstruction (lowbit/reconstruct.py), N Adam steps per YOLO block")
    images: int = Field(32, ge=1, description="calibration images [0, N) the reconstruction learns on")
    batch: int = Field(2, ge=1, description="images per step")

    @field_validator("iterations")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError("iterations must be distinct and >= 0 (0: no reconstruction)")
        return v

    @model_validator(mode="after")
    def _batch_fits(self):
        if self.batch > self.images:
            raise ValueError(f"batch ({self.batch}) is larger than images ({self.images}): lower batch or raise images")
        return self


class CandidatesCfg(Section):
    enabled: bool = True
    ladder: list[str] = Field(default_factory=_default_ladder, min_length=1,
                              description=f"4-bit PTQ methods measured in order: {method_grammar()}")
    ladder_schemes: list[str] = Field(default_factory=lambda: ["budget75-w4a8-w8a8"], min_length=1,
                                      description="notebook 04 schemes the ladder is measured on")
    ladder_confirm: bool = Field(False, description="also every ladder rung on the confirmation split (slow; the pick stays on select)")
    method: str = Field("auto", description="4-bit method of every candidate; auto: the ladder's best on the selection split")
    schemes: list[str] | None = Field(default_factory=lambda: ["budget50-w4a8-w8a8", "budget75-w4a8-w8a8"],
                                      description="notebook 04 schemes to materialise (null: all of them)")
    integer_schemes: list[str] = Field(default_factory=lambda: ["budget75-w4a8-w8a8"],
                                       description="schemes also built in the integer-kernel form: their 4-bit codes "
                                       "(the method per output channel) in notebook 03's best ORT recipe with placement all, run as QLinearConv")
    fp8: bool = Field(False, description="also every Conv in fp8 (e4m3 Q/DQ)")
    random_schemes: int = Field(0, ge=0, description="random schemes with the guided budget scheme's 4-bit share")
    random_budget: float = Field(75.0, gt=0, lt=100, description="the budget the random and heuristic schemes match")
    heuristic: bool = Field(False, description="also all Convs in 4-bit except the first block and the head")
    stats_images: int = Field(32, ge=1, description="calibration images [0, N) for GPTQ / bias-correction statistics")
    select_subset: str = Field("val500", description="winners (method, candidate per budget) are chosen here")
    confirm_subset: str = Field("val1300", description="winners are confirmed on these images minus the selection split")
    confirm: Literal["winners", "all"] = Field("winners", description="which candidates get the confirmation split")
    exact: bool = Field(True, description="candidates ORT runs through integer kernels also with exact Q/DQ arithmetic")
    openvino_budgets: list[float] = Field(default_factory=lambda: [75.0], description="budgets whose winner (the scheme's "
                                          "arithmetic) is also scored under OpenVINO on the confirmation split, where OpenVINO compiles it "
                                          "(a budget not in sensitivity.budgets has no winner: ignored, so that the default "
                                          "holds with any budget list, as rank_as's entries do)")
    latency: bool = True
    reconstruction: ReconstructionCfg = ReconstructionCfg()

    @field_validator("ladder")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_method(name)
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return v if v == "auto" else _check_method(v)


def _check_method(name: str) -> str:
    try:
        parse_method(name)
    except LowbitError:
        raise ValueError(f"unknown 4-bit method {name!r}; use {method_grammar()}") from None
    return name


class OutputCfg(Section):
    runs_dir: str = "runs"
    reports_dir: str = "reports"


class Config(Section):
    name: str = Field(..., min_length=1, description="names the run directory and report")
    description: str = ""
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    decode: DecodeCfg = DecodeCfg()
    evaluation: EvaluationCfg = EvaluationCfg()
    runtime: RuntimeCfg = RuntimeCfg()
    latency: LatencyCfg = LatencyCfg()
    parity: ParityCfg = ParityCfg()
    int8: Int8Cfg = Int8Cfg()
    sensitivity: SensitivityCfg = SensitivityCfg()
    candidates: CandidatesCfg = CandidatesCfg()
    output: OutputCfg = OutputCfg()

    def resolved(self, base: str | Path | None = None) -> "Config":
        """Copy with every relative path made absolute against ``base`` (default: the cwd)."""
        base = Path(base or Path.cwd())

        def absolute(p: str) -> str:
            return str((base / Path(p).expanduser()).resolve())

        weights = self.model.weights
        if looks_like_path(weights):
            weights = absolute(weights)
        data = self.data.model_copy(update={"coco_root": absolute(self.data.coco_root)})
        output = OutputCfg(runs_dir=absolute(self.output.runs_dir), reports_dir=absolute(self.output.reports_dir))
        model = self.model.model_copy(update={"weights": weights})
        return self.model_copy(update={"model": model, "data": data, "output": output})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def looks_like_path(weights: str) -> bool:
    return weights.endswith((".pt", ".onnx")) or "/" in weights and not weights.startswith("random:")


def parse_config(data: Any, source: str = "params") -> Config:
    if not isinstance(data, dict):
        raise LowbitError(
            f"{source}: expected a mapping of params keys at the top level, found {type(data).__name__}",
            "start from params/default.yaml and keep its layout",
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key")
            else:
                lines.append(f"{key}: {err['msg']} (found {err.get('input')!r})")
        raise LowbitError(
            f"{source}: invalid params\n    " + "\n    ".join(lines),
            "correct or remove the keys above; params/default.yaml lists every valid key with its type",
        ) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"params file not found: {path}", "pass an existing YAML, e.g. params/default.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LowbitError(f"{path}: not valid YAML ({exc})", "fix the YAML syntax at the position shown") from None
    return parse_config(data, source=str(path))
