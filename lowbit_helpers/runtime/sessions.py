"""One session factory for ONNX Runtime and OpenVINO: every model this project runs is opened here.

Every session answers ``get_inputs()`` and ``run(None, {name: tensor})`` the way an ORT
``InferenceSession`` does, so evaluation, statistics and benchmarks treat both runtimes alike.
A model is a file or an in-memory ``onnx.ModelProto`` (the sensitivity sweep's sub-graphs, the
calibration statistics' graphs with extra outputs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import LowbitError
from .machine import _openvino_version

# kernels: what ORT deploys; exact: the graph as written; simulated: the fake-quantized graph in float (see make_session)
ARITHMETICS = ("kernels", "exact", "simulated")
OPENVINO_PRECISIONS = ("f32", "bf16")  # OpenVINO's CPU inference precision hint


def check_providers(providers: list[str] | None) -> list[str]:
    """``providers`` (default: CPU) if this onnxruntime has them all, else one clear error."""
    providers = providers or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise LowbitError(
            f"execution provider(s) {', '.join(unknown)} not available in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)})",
            "use runtime.providers: [CPUExecutionProvider] here, or install the gpu environment on a GPU machine",
        )
    return providers


def make_session(model: str | Path | onnx.ModelProto, providers: list[str] | None = None, threads: int = 2,
                 optimized_path: str | Path | None = None, profile_prefix: str | Path | None = None,
                 arithmetic: str = "kernels", runtime: str = "ort", precision: str = "f32", spinning: bool = True,
                 disabled_optimizers: Iterable[str] = (), memory_arena: bool = True, widen_int4: bool | None = None,
                 properties: dict | None = None):  # fmt: skip
    """A session with fixed, documented options (the same for every variant).

    ``spinning`` False stops ORT's intra-op threads from spin-waiting between runs: the setting
    of every latency benchmark here, where sessions (and OpenVINO's threads) are interleaved in
    one process on few cores and spinning threads of one steal the cores of the next (measured:
    ORT FP32 ran 1.8x slower beside a spinning INT8 session on 2 cores).

    ``runtime``: ``ort`` (ONNX Runtime, ``providers``) or ``openvino`` (OpenVINO's CPU plugin,
    reading the ONNX directly; ``precision`` f32 or bf16 is its inference precision hint, and
    ``arithmetic`` does not apply: OpenVINO always runs its own fused kernels).

    ``threads`` is the intra-op pool size; inter-op is 1 and execution sequential, so two
    sessions compare fairly on the same cores. ``optimized_path`` saves the graph ORT runs;
    ``profile_prefix`` turns on ORT's profiler, writing there.

    ``arithmetic``: ``kernels`` is what ORT deploys (all graph optimizations: Q/DQ fused into
    integer kernels, whose results depend on the CPU's int8 instructions); ``exact`` runs the
    graph as written (optimizations and weight pre-packing off): every Q/DQ computed as the
    ONNX spec defines it, the machine-independent reference that TensorRT and VNNI kernels aim
    at. A graph with float8 Q/DQ runs with ORT's Q/DQ fusion off under ``kernels`` too: ORT's
    CPU has no float8 kernels and refuses the fused node. ``simulated`` keeps every other
    optimization but never fuses Q/DQ into integer kernels nor re-quantizes a float Conv's weights
    (ORT's QDQSelectorActionTransformer and WeightBiasQuantization off): a fake-quantized Conv
    stays a float Conv with exactly the given weights (the sensitivity sweep, calibration
    statistics). ``disabled_optimizers`` turns more of ORT's optimizers off.

    ``model`` may be an in-memory ``onnx.ModelProto``; ``memory_arena`` False frees each run's
    buffers (many small sessions alive at once in the sweep).

    ``widen_int4``: open :func:`widened_int4` of the model (its per-channel INT4 weights as INT8
    initializers of the same integers), so that ORT's CPU fuses their Convs into ``QLinearConv``;
    None (the default): as the file asks (:data:`LOAD_KEY` in its metadata, written by
    :func:`lowbit_helpers.lowbit.integer_form.integer_form`).

    ``properties``: the runtime's own settings over the defaults here (OpenVINO: CPU plugin properties,
    such as ``ENABLE_CPU_PINNING``; notebook 03's settings bench, ``int8.openvino_settings``).
    """
    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
    if runtime != "ort":  # a registered runtime: its own session class
        return OTHER_RUNTIMES[runtime](model, threads, precision, properties)
    if properties:
        raise ValueError("properties are a setting of the other runtimes (OpenVINO), not ORT's")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, not {arithmetic!r}")
    providers = check_providers(providers)
    in_memory = isinstance(model, onnx.ModelProto)
    if not in_memory:
        model = Path(model)
        if not model.is_file():
            raise LowbitError(f"model not found: {model}", "give an existing .onnx file")
    try:
        if widen_int4 is None:
            widen_int4 = load_request(model) == WIDEN_INT4
        if widen_int4:
            model, in_memory = widened_int4(model), True
    except Exception as exc:  # a truncated or corrupt file: protobuf's DecodeError
        raise LowbitError(f"onnxruntime cannot load {model}: {exc}", "check that the file is a complete ONNX model") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    exact = arithmetic == "exact"
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_DISABLE_ALL" if exact else "ORT_ENABLE_ALL")
    if exact:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not memory_arena:
        so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if arithmetic == "simulated":
        disabled = ["QDQSelectorActionTransformer", "WeightBiasQuantization"]
    else:
        disabled = (["QDQSelectorActionTransformer"] if has_float8(model) else []) + kept_float_rewrite(model)
    disabled += [d for d in disabled_optimizers if d not in disabled]
    what = "an in-memory model" if in_memory else model
    try:
        source = model.SerializeToString() if in_memory else str(model)
        return ort.InferenceSession(source, sess_options=so, providers=providers, disabled_optimizers=disabled or None)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise LowbitError(f"onnxruntime cannot load {what}: {exc}", "check that the file is a complete ONNX model") from None


# Engines: a runtime with its arithmetic, the unit every accuracy row is measured under.
#   ort: ORT's fused integer kernels (this CPU's int8 ISA decides their result);
#   ort-exact: ORT with graph optimizations off, the Q/DQ graph computed as the ONNX spec says;
#   openvino / openvino-bf16: OpenVINO's CPU plugin at f32 / bf16 inference precision.
ENGINES = {"ort": ("ort", "kernels", "f32"), "ort-exact": ("ort", "exact", "f32"),
           "openvino": ("openvino", "kernels", "f32"), "openvino-bf16": ("openvino", "kernels", "bf16")}  # fmt: skip


def runtime_unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine (a "skipped: ..." line), or None when it can."""
    if runtime == "openvino" and _openvino_version() is None:
        return "skipped: openvino is not installed (pip install the pinned environment)"
    return None


def engine_unavailable(engine: str) -> str | None:
    """Why ``engine`` cannot run on this machine (a "skipped: ..." line), or None when it can."""
    why = runtime_unavailable(ENGINES[engine][0])
    if why or ENGINES[engine][0] != "openvino":
        return why
    if ENGINES[engine][2] == "bf16" and not _openvino_has_bf16():
        return "skipped: this CPU has no bf16 instructions"
    return None


def _openvino_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 inference on this CPU."""
    if core is None:
        import openvino as ov  # late: openvino is optional, only its rows need it

        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def engine_session(model: str | Path, engine: str | tuple, providers: list[str] | None = None, threads: int = 2):
    """:func:`make_session` for one of ``ENGINES``, or for ``(engine, ((property, value), ...))``: an
    OpenVINO engine with CPU properties of its own (:func:`with_properties`)."""
    engine, properties = (engine, ()) if isinstance(engine, str) else engine
    if engine not in ENGINES:
        raise LowbitError(f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
    runtime, arithmetic, precision = ENGINES[engine]
    return make_session(model, providers, threads, arithmetic=arithmetic, runtime=runtime, precision=precision,
                        properties=dict(properties) or None)  # fmt: skip


def with_properties(engine: str, properties: dict) -> tuple:
    """An engine spec with runtime properties (hashable and picklable: a worker keys its sessions on it)."""
    return (engine, tuple(sorted(properties.items())))


def openvino_refusal(exc: LowbitError) -> str:
    """OpenVINO's reason in one line, from :class:`OpenVINOSession`'s compile error: its own message
    (``exc.engine_message``) less its source locations."""
    lines = [ln.strip() for ln in getattr(exc, "engine_message", exc.cause).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(("Exception from", "Check '"))]
    return " ".join(kept)[:200] or "OpenVINO cannot compile it"


def try_openvino(model: str | Path, threads: int = 2, properties: dict | None = None):
    """(the OpenVINO session, None), or (None, OpenVINO's one-line reason) where it will not compile
    ``model`` (with ``properties``): a refusal to record, not an error."""
    try:
        return make_session(model, threads=threads, runtime="openvino", properties=properties), None
    except LowbitError as exc:
        return None, openvino_refusal(exc)


def openvino_setting_unavailable(properties: dict) -> str | None:
    """Why this machine cannot run an OpenVINO setting (no OpenVINO; bf16 without bf16 instructions), or None."""
    if why := runtime_unavailable("openvino"):
        return why
    if str(properties.get("INFERENCE_PRECISION_HINT", "")).lower() == "bf16" and not _openvino_has_bf16():
        return "skipped: this CPU has no bf16 instructions"
    return None


def check_openvino_properties(settings: dict[str, dict]) -> None:
    """Refuses, before anything runs, a setting whose property the installed OpenVINO's CPU plugin
    lacks or whose value it refuses (``int8.openvino_settings``): each setting compiles a one-op model."""
    import openvino as ov  # late: openvino is optional, only its rows need it

    core = ov.Core()
    supported = core.get_property("CPU", "SUPPORTED_PROPERTIES")
    for name, props in settings.items():
        for key in props:
            if supported.get(key) != "RW":
                raise LowbitError(f"int8.openvino_settings.{name}: OpenVINO {ov.__version__.split('-')[0]}'s CPU plugin has no settable "
                                  f"property {key!r}", "use one of " + ", ".join(k for k, m in supported.items() if m == "RW")
                                  + " (or install an OpenVINO that has it)")  # fmt: skip
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    tiny = core.read_model(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "t", [x], [y]),
                                                 opset_imports=[onnx.helper.make_opsetid("", 13)]).SerializeToString(), b"")  # fmt: skip
    for name, props in settings.items():
        if openvino_setting_unavailable(props):
            continue  # skipped where it runs, with its reason
        try:
            core.compile_model(tiny, "CPU", dict(props))
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise LowbitError(f"int8.openvino_settings.{name}: OpenVINO {ov.__version__.split('-')[0]} refuses {props}: {why}",
                              "give each property a value OpenVINO's CPU plugin takes (see its documentation)") from None  # fmt: skip


class OpenVINOSession:
    """An OpenVINO CPU compiled model behind ORT's session interface (inputs, ``run``).

    Latency hint, one stream, ``threads`` inference threads: the same footing as the ORT
    sessions it is timed beside. The output is copied out of OpenVINO's buffer, which the next
    inference overwrites.
    """

    def __init__(self, model: str | Path, threads: int = 2, precision: str = "f32", properties: dict | None = None):
        if precision not in OPENVINO_PRECISIONS:
            raise LowbitError(f"unknown OpenVINO precision {precision!r}", f"use one of {', '.join(OPENVINO_PRECISIONS)}")
        try:
            import openvino as ov  # late: openvino is optional, only its rows need it
        except ImportError:
            raise LowbitError("the openvino package is not installed",
                              "install the pinned environment (bash scripts/test.sh creates it) or pip install openvino") from None  # fmt: skip
        model = Path(model)
        if not model.is_file():
            raise LowbitError(f"model not found: {model}", "give an existing .onnx file")
        core = ov.Core()
        if precision == "bf16" and not _openvino_has_bf16(core):
            raise LowbitError("this CPU has no bf16 support in OpenVINO", "use precision f32 here")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1}  # fmt: skip
        if threads == 1:  # the evaluation's one-thread workers share the cores (evaluate.predict_models): pinned,
            config["ENABLE_CPU_PINNING"] = False  # each would run on the same first core
        if properties:
            config.update({k: v for k, v in properties.items() if not (threads == 1 and k == "ENABLE_CPU_PINNING")})
        t0 = time.perf_counter()
        try:
            self.compiled = core.compile_model(str(model), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            fix = ("check the values of int8.openvino_settings against OpenVINO's CPU properties" if properties else
                   "check the file with onnx.checker, or run it with --runtime ort")  # fmt: skip
            err = LowbitError(f"OpenVINO cannot compile {model}" + (f" with {properties}" if properties else "")
                              + f": {str(exc)[:300]}", fix)  # fmt: skip
            err.engine_message = str(exc)  # OpenVINO's own words, for a one-line refusal (openvino_refusal)
            raise err from None
        self.compile_seconds = time.perf_counter() - t0
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.version = ov.__version__
        port = self.compiled.input(0)
        shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        self._inputs = [_Input(port.get_any_name(), shape)]

    def get_inputs(self):
        return self._inputs

    def get_providers(self) -> list[str]:
        return [f"OpenVINO {self.version} CPU ({self.precision})"]

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        (tensor,) = feeds.values()
        result = self.request.infer({0: tensor})
        return [np.array(result[self.compiled.output(0)], copy=True)]


# The runtimes besides ORT: name -> a session class taking (model, threads, precision) with ORT's
# session interface (get_inputs, get_providers, run). A new runtime is one such class and one line here,
# plus its rows in ENGINES.
OTHER_RUNTIMES = {"openvino": OpenVINOSession}
RUNTIMES = ("ort", *OTHER_RUNTIMES)


class _Input:
    def __init__(self, name: str, shape: list):
        self.name, self.shape = name, shape


def _graph(model: str | Path | onnx.ModelProto) -> onnx.GraphProto:
    """The graph of a file (read without its external data) or of an in-memory model."""
    return model.graph if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False).graph


def has_float8(model: str | Path | onnx.ModelProto) -> bool:
    """Whether the model holds float8 tensors."""
    g = _graph(model)
    f8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
          onnx.TensorProto.FLOAT8E5M2FNUZ}  # fmt: skip
    return any(i.data_type in f8 for i in g.initializer)


def float_convs_between_qdq(model: str | Path | onnx.ModelProto) -> list[str]:
    """Convs a recipe kept in float (float weights, or an integer-kernel form's dequantized INT4
    weights with a float bias) that sit between a DequantizeLinear and a QuantizeLinear: the ones
    ORT's WeightBiasQuantization rewrite would quantize at load time."""
    g = _graph(model)
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    def float_layer(n) -> bool:  # float weights, or dequantized weights with a float bias (ORT would quantize the bias)
        dq_weight = getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"
        return n.input[1] in inits or (dq_weight and len(n.input) > 2 and n.input[2] in inits)

    return [n.name for n in g.node if n.op_type == "Conv" and float_layer(n)
            and getattr(producer.get(n.input[0]), "op_type", None) == "DequantizeLinear"
            and any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))]  # fmt: skip


def kept_float_rewrite(model: str | Path | onnx.ModelProto) -> list[str]:
    """The ORT optimizers turned off for ``model`` so that a Conv the recipe kept in float runs in float.

    ORT's WeightBiasQuantization (1.2x) quantizes the weights of a float Conv between DQ and Q at
    load time so that its QDQ fusion can make it a QLinearConv: what runs is then neither the float
    layer the recipe asked for nor the graph's exact arithmetic, and its error moves with the images
    (measured: ort-avgminmax-keep6 on YOLOv10n, raw-head SQNR of ORT's kernels against the exact
    arithmetic 25.5 dB with the rewrite, 34.5 dB without, the level of every other recipe). Every
    ORT session here turns it off for such files, and so should a deployment of them.
    """
    return ["WeightBiasQuantization"] if float_convs_between_qdq(model) else []


# A model's request to the loader, in its metadata_props: WIDEN_INT4 (its INT4 weights run as INT8)
LOAD_KEY, WIDEN_INT4 = "lowbit.load", "widen-int4"


def load_request(model: str | Path | onnx.ModelProto) -> str | None:
    """What the file's :data:`LOAD_KEY` metadata asks of the loader (None: nothing)."""
    props = model.metadata_props if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False).metadata_props
    return next((p.value for p in props if p.key == LOAD_KEY), None)


def widened_int4(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every INT4 input of a per-channel or per-tensor ``DequantizeLinear`` (codes and
    zero point) stored as INT8: the same integers, so the same arithmetic, in the type ORT's CPU
    ``QLinearConv`` takes (it has no INT4 kernel). Blocked ``DequantizeLinear`` stays INT4 (no
    ``QLinearConv`` runs blocked scales). ``model`` itself is not changed.

    Our own code: ORT has no load-time option that widens INT4 initializers."""
    if isinstance(model, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = onnx.load(str(model))
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def blocked(n) -> bool:
        return any(a.name == "block_size" and a.i > 0 for a in n.attribute)

    for name, t in inits.items():
        if t.data_type != onnx.TensorProto.INT4:
            continue
        users = readers.get(name, [])
        if users and all(u.op_type == "DequantizeLinear" and not blocked(u) for u in users):
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.int8), name))
    return out


def run_head(session, tensor: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: tensor})[0]
