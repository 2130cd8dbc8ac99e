"""The integer-kernel form of a scheme: its 4-bit codes inside the ORT INT8 recipe's file."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from lowbit_helpers.errors import LowbitError
from lowbit_helpers.int8.ort import quantize_int8_ort
from lowbit_helpers.lowbit import parse_method
from lowbit_helpers.lowbit.integer_form import integer_form
from lowbit_helpers.lowbit.stats import collect_stats
from lowbit_helpers.runtime import make_session
from lowbit_helpers.runtime.sessions import widened_int4
from lowbit_helpers.sensitivity.sweep import conv_nodes

from .test_materialize import _net as _materialize_net


def _net() -> onnx.ModelProto:
    """tests/test_materialize.py's net, its input named as ORT's quantizer feeds it (``images``)."""
    m = _materialize_net()
    m.graph.input[0].name = m.graph.node[0].input[0] = "images"
    return m


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """_net's ORT INT8 recipe (placement all) and the scheme {dense: w4a8, depthwise: w8a8, 1x1: w4a16}
    in its integer form with gptq-bc."""
    tmp = tmp_path_factory.mktemp("intform")
    model = _net()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(10, 3, 16, 16)).astype(np.float32)
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(model, str(fp32))
    quantize_int8_ort(fp32, int8, x[:6], method="avgminmax", head_policy="none")
    convs = conv_nodes(model)
    nodes = {convs[0]: "w4a8", convs[1]: "w8a8", convs[2]: "w4a16"}
    stats = collect_stats(model, convs, x[:6], threads=1)
    q, info = integer_form(onnx.load(str(int8)), model, nodes, "gptq-bc", stats=stats)
    path = tmp / "int.onnx"
    onnx.save(q, str(path))
    return {"model": model, "int8": int8, "path": path, "q": q, "info": info, "x": x[6:], "stats": stats,
            "convs": convs, "tmp": tmp}  # fmt: skip


def _consumer_dq(g: onnx.GraphProto, conv: str, k: int) -> onnx.NodeProto:
    node = next(n for n in g.node if n.name == conv)
    return next(n for n in g.node if node.input[k] in n.output)


def _fused(path, tmp, **kw) -> dict:
    opt = tmp / "opt.onnx"
    make_session(path, threads=1, optimized_path=opt, **kw)
    ops: dict[str, int] = {}
    for n in onnx.load(str(opt)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_the_integer_form_holds_the_methods_codes_and_bias_on_their_scales(built):
    """The INT4 initializer and scales of each 4-bit Conv are GPTQ's own (as materialize writes them),
    its int32 bias is ``round((b - shift) / (s_x s_w))`` on those scales, and the 8-bit Conv keeps the
    recipe's INT8 weights untouched."""
    model, q, stats = built["model"], built["q"], built["stats"]
    m = parse_method("gptq-bc")
    f_inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inits = {i.name: i for i in q.graph.initializer}
    recipe = {i.name: i for i in onnx.load(str(built["int8"])).graph.initializer}
    for k, conv in enumerate(built["convs"]):
        node = next(n for n in model.graph.node if n.name == conv)
        w, b = f_inits[node.input[1]], f_inits[node.input[2]]
        w_dq, b_dq, x_dq = (_consumer_dq(q.graph, conv, i) for i in (1, 2, 0))
        if k == 1:  # w8a8: the recipe's own INT8 codes
            assert inits[w_dq.input[0]] == recipe[w_dq.input[0]]
            assert built["info"]["layers"][conv]["deployed"] == "int8"
            continue
        assert inits[w_dq.input[0]].data_type == TensorProto.INT4
        codes = numpy_helper.to_array(inits[w_dq.input[0]]).astype(np.int8)
        scale = numpy_helper.to_array(inits[w_dq.input[1]])
        spec = m.spec(4)
        assert np.array_equal(scale, m.rounding.scales(w, spec, stats[conv]))
        assert np.array_equal(codes, m.rounding.codes(w, scale, spec, stats[conv]))
        from lowbit_helpers.lowbit.bias_shift import expected_output_shift
        from lowbit_helpers.weights import dequantize

        shift = expected_output_shift(w, dequantize(codes, scale, None), stats[conv])
        assert np.abs(shift).max() > 0  # there is a shift to correct
        s_x = float(numpy_helper.to_array(inits[x_dq.input[1]]))
        b_scale = numpy_helper.to_array(inits[b_dq.input[1]])
        assert np.array_equal(b_scale, (s_x * scale.astype(np.float64)).astype(np.float32))
        want = np.round((b - shift).astype(np.float64) / b_scale).astype(np.int32)
        assert np.array_equal(numpy_helper.to_array(inits[b_dq.input[0]]), want)
        assert built["info"]["layers"][conv]["deployed"] == "int4"
    assert built["info"]["four_bit_share"] == pytest.approx((40 * 27 + 16 * 40) / (40 * 27 + 40 * 9 + 16 * 40))


def test_widening_at_load_is_exact_and_makes_the_4bit_convs_integer_kernels(built, tmp_path):
    """Opened with ``widen_int4`` (what the file's metadata asks, so the default), the INT4 file
    computes bit for bit what it computes as written (exact Q/DQ), and ORT fuses every Conv into
    QLinearConv, which it does not do for the INT4 file as written (why the widening exists)."""
    path, x = built["path"], built["x"]

    def run(**kw):
        s = make_session(path, threads=1, **kw)
        return np.concatenate([s.run(None, {"images": xi[None]})[0] for xi in x])

    exact = run(arithmetic="exact", widen_int4=False)
    assert np.array_equal(run(arithmetic="exact", widen_int4=True), exact)
    assert _fused(path, tmp_path, widen_int4=True).get("QLinearConv") == 3
    assert _fused(path, tmp_path).get("QLinearConv") == 3  # the file asks for it: every session here widens
    assert _fused(path, tmp_path, widen_int4=False).get("QLinearConv", 0) == 1  # only the INT8 Conv as written
    kernels = run()
    assert np.abs(kernels - exact).max() <= 0.02 * np.abs(exact).max()  # the same integers, ORT's requantization
    # the file on disk keeps INT4 codes; widened_int4 does not change its argument
    q = built["q"]
    widened = widened_int4(q)
    types = lambda m: sorted(i.data_type for i in m.graph.initializer if i.name.endswith("_quantized"))  # noqa: E731
    assert TensorProto.INT4 in types(q) and TensorProto.INT4 not in types(widened)


def test_widening_leaves_blocked_codes_alone():
    """A blocked DequantizeLinear (no QLinearConv runs blocked scales) keeps its INT4 codes."""
    from lowbit_helpers.lowbit.materialize import materialize

    model = _net()
    convs = conv_nodes(model)
    q, _ = materialize(model, {convs[2]: "w4a16"}, "rtn-b8")
    w = widened_int4(q)
    assert [i.data_type for i in w.graph.initializer if "::wq" in i.name] == [TensorProto.INT4]
    q2, _ = materialize(model, {convs[2]: "w4a16"}, "rtn")
    assert [i.data_type for i in widened_int4(q2).graph.initializer if "::wq" in i.name] == [TensorProto.INT8]


def test_the_integer_form_refuses_blocked_scales_and_other_models(built):
    int8 = onnx.load(str(built["int8"]))
    nodes = {built["convs"][0]: "w4a8"}
    with pytest.raises(LowbitError, match="blocked scales"):
        integer_form(int8, built["model"], nodes, "gptq-bc-b8", stats=built["stats"])
    with pytest.raises(LowbitError, match="calibration statistics"):
        integer_form(int8, built["model"], nodes, "gptq-bc")
    other = _net()
    other.graph.node[0].name = "/other/Conv"
    with pytest.raises(LowbitError, match="not Conv nodes of this model|not the float model"):
        integer_form(int8, other, {"/other/Conv": "w4a8"}, "rtn")



def test_a_conv_the_recipe_keeps_float_stays_float_in_4bit(tmp_path):
    """A Conv the INT8 recipe kept in float between a DequantizeLinear and a QuantizeLinear, put in
    4-bit by the scheme, runs as a float Conv on its INT4 weights: ORT's WeightBiasQuantization,
    which would quantize its float bias and fuse it into a QLinearConv, is turned off for it
    (without that, ORT fuses all three Convs here)."""
    from lowbit_helpers.runtime.sessions import float_convs_between_qdq

    model = _net()
    convs = conv_nodes(model)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(fp32))
    x = np.random.default_rng(12).normal(size=(4, 3, 16, 16)).astype(np.float32)
    quantize_int8_ort(fp32, int8, x, method="avgminmax", head_policy="none", exclude=[convs[1]])
    q, info = integer_form(onnx.load(str(int8)), model, {c: "w4a16" for c in convs}, "rtn")
    assert info["layers"][convs[1]]["deployed"] == "int4 weights, float Conv"
    assert float_convs_between_qdq(q) == [convs[1]]
    path = tmp_path / "int.onnx"
    onnx.save(q, str(path))
    ops = _fused(path, tmp_path)
    assert ops.get("QLinearConv") == 2 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1


def test_per_channel_names_and_a_truncated_file(tmp_path):
    assert [parse_method(n).per_channel for n in ("gptq-bc-b32", "rtn-b064", "gptq-bc", "adaround-bc-b8")] == [
        "gptq-bc", "rtn", "gptq-bc", "adaround-bc"]  # fmt: skip
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(_net().SerializeToString()[:200])
    with pytest.raises(LowbitError, match="cannot load"):
        make_session(bad)
