"""Codec round trips through the Tinker SDK's own encoders/decoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from twinkle.server.tinker import codec
from twinkle.types import (
    ForwardBackwardOutput,
    InvalidInputError,
    LimitExceededError,
    SampledSequence,
    SampleResponse,
    TensorData,
)


def _sdk_request(loss_fn="ppo", config=None, forward_only=False):
    data = [
        tt.Datum(
            model_input=tt.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={
                "target_tokens": tt.TensorData(data=[6, 7, 8], dtype="int64", shape=[3]),
                "advantages": tt.TensorData(data=[0.0, 1.5, -2.0], dtype="float32", shape=[3]),
                "logprobs": tt.TensorData(data=[-1.0, -0.5, -0.25], dtype="float32", shape=[3]),
            },
        ),
        tt.Datum(
            model_input=tt.ModelInput.from_ints([9, 10]),
            loss_fn_inputs={
                "target_tokens": tt.TensorData(data=[10, 11], dtype="int64", shape=[2]),
                "advantages": tt.TensorData(data=[1.0, 1.0], dtype="float32", shape=[2]),
                "logprobs": tt.TensorData(data=[-3.0, -4.0], dtype="float32", shape=[2]),
            },
        ),
    ]
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s1:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def test_decode_forward_backward_matches_sdk_encoding():
    body = _sdk_request(config={"clip_low_threshold": 0.7, "mode": "fancy"}, forward_only=True)
    req = codec.decode_forward_backward(body)
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == ("s1:train:0", 7, "ppo", True)
    assert req.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7), "mode": "fancy"}
    assert [d.model_input.to_ints() for d in req.data] == [[5, 6, 7], [9, 10]]
    d0 = req.data[0].loss_fn_inputs
    assert d0["target_tokens"].dtype == "int64" and d0["target_tokens"].tolist() == [6, 7, 8]
    assert d0["advantages"].dtype == "float32" and d0["advantages"].tolist() == [0.0, 1.5, -2.0]
    assert req.data[1].loss_fn_inputs["logprobs"].tolist() == [-3.0, -4.0]


def test_decode_zstd_body_and_garbage():
    body = _sdk_request(loss_fn="cross_entropy")
    req = codec.decode_forward_backward(zstandard.ZstdCompressor().compress(body), "zstd")
    assert req.loss_fn == "cross_entropy" and req.loss_fn_config is None and len(req.data) == 2
    with pytest.raises(InvalidInputError) as e:
        codec.decode_forward_backward(b"\xff\x00garbage", None)
    assert e.value.field == "body"


def test_decode_sparse_csr_and_2d_targets():
    td = tt.TensorData(
        data=[0.5, 2.0], dtype="float32", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[2, 0]
    )
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=[tt.Datum(model_input=tt.ModelInput.from_ints([1, 2]),
                           loss_fn_inputs={"weights": td,
                                           "target_tokens": tt.TensorData(data=[1, 2, 3, 4, 5, 6], dtype="int64", shape=[2, 3])})],
            loss_fn="cross_entropy",
        ),
        model_id="m", seq_id=1,
    )
    out = codec.decode_forward_backward(forward_backward_request_to_proto(req).SerializeToString())
    w = out.data[0].loss_fn_inputs["weights"].to_numpy()
    assert w.shape == (2, 3) and w.tolist() == [[0, 0, 0.5], [2.0, 0, 0]]
    assert out.data[0].loss_fn_inputs["target_tokens"].to_numpy().shape == (2, 3)


def _sparse_request(n_tokens: int, shape: list[int]) -> bytes:
    rows = shape[0]
    td = tt.TensorData(data=[1.0], dtype="float32", shape=shape, sparse_crow_indices=[0] + [1] * rows,
                       sparse_col_indices=[0])
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=[tt.Datum(model_input=tt.ModelInput.from_ints(list(range(1, n_tokens + 1))),
                           loss_fn_inputs={"weights": td})], loss_fn="cross_entropy"),
        model_id="m", seq_id=1)
    return forward_backward_request_to_proto(req).SerializeToString()


@pytest.mark.parametrize("shape,error,field_end", [
    ([1, 16_000_000], InvalidInputError, "weights"),  # rows must be the datum's tokens: nothing densified
    ([3, 5_000_000], LimitExceededError, "weights"),  # (N, K) with K over MAX_INPUT_COLUMNS
    ([3, 2, 2], InvalidInputError, "weights"),
])
def test_a_sparse_input_describes_no_more_than_its_datum(shape, error, field_end):
    with pytest.raises(error) as e:
        codec.decode_forward_backward(_sparse_request(3, shape))
    assert e.value.field.endswith(field_end)
    ok = codec.decode_forward_backward(_sparse_request(3, [3, codec.MAX_INPUT_COLUMNS]))
    assert ok.data[0].loss_fn_inputs["weights"].to_numpy().shape == (3, codec.MAX_INPUT_COLUMNS)


def test_sparse_inputs_decode_to_no_more_values_than_a_dense_body_could_carry():
    body = _sparse_request(3, [3, codec.MAX_INPUT_COLUMNS])  # 192 values from a body of a few dozen bytes
    assert len(body) < 200
    codec.decode_forward_backward(body, max_bytes=4 * 192)
    with pytest.raises(LimitExceededError) as e:
        codec.decode_forward_backward(body, max_bytes=4 * 191)
    assert e.value.field == "data[0].loss_fn_inputs.weights"


def test_tokens_are_counted_on_the_wire_before_decoding():
    body = _sdk_request(loss_fn="cross_entropy")  # 5 tokens in two datums
    assert len(codec.decode_forward_backward(body, max_tokens=5).data) == 2
    with pytest.raises(LimitExceededError) as e:
        codec.decode_forward_backward(body, max_tokens=4)
    assert e.value.field == "data"


def test_forward_backward_output_roundtrip_through_sdk_decoder():
    out = ForwardBackwardOutput(
        loss_fn_outputs=[
            {"logprobs": TensorData.from_numpy(np.array([-1.0, -2.0, -3.0], dtype=np.float32))},
            {"logprobs": TensorData.from_numpy(np.array([-0.5], dtype=np.float32))},
            # ragged trailing shape starts a new ArrayRecord
            {"logprobs": TensorData.from_numpy(np.array([[-1.0, -2.0], [-3.0, -4.0]], dtype=np.float32))},
        ],
        metrics={"loss:sum": 6.5, "entropy": 0.3, "loss:avg": 1.0},
    )
    sdk = deserialize_forward_backward_output(codec.encode_forward_backward_output(out))
    assert len(sdk.loss_fn_outputs) == 3
    assert sdk.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -3.0]
    assert sdk.loss_fn_outputs[1]["logprobs"].tolist() == [-0.5]
    assert sdk.loss_fn_outputs[2]["logprobs"].shape == [2, 2]
    assert sdk.metrics == {"loss:sum": 6.5, "entropy:mean": pytest.approx(0.3), "loss:mean": 1.0}
    # the SDK's merge accepts every key (it raises on a key without a colon)
    from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results

    merged = combine_fwd_bwd_output_results([sdk, sdk])
    assert merged.metrics["loss:sum"] == pytest.approx(13.0)


def test_sample_response_roundtrip_with_last_n_and_topk():
    resp = SampleResponse(
        sequences=[
            SampledSequence(stop_reason="stop", tokens=[4, 5, 2], logprobs=[-0.1, -0.2, -0.3]),
            SampledSequence(stop_reason="length", tokens=[7], logprobs=[-1.5]),
        ],
        prompt_logprobs=[None, -1.0, -2.0, -3.0],
        topk_prompt_logprobs=[None, [(3, -0.5), (4, -1.0)], [(5, -0.2)], [(6, -0.1), (1, -3.0)]],
    )
    sdk = deserialize_sample_response(codec.encode_sample_response(resp, prompt_logprobs_last_n=2, topk_prompt_k=2))
    assert [s.stop_reason for s in sdk.sequences] == ["stop", "length"]
    assert sdk.sequences[0].tokens == [4, 5, 2]
    assert sdk.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert sdk.prompt_logprobs == [None, None, -2.0, -3.0]
    assert sdk.topk_prompt_logprobs == [None, None, [(5, pytest.approx(-0.2))], [(6, pytest.approx(-0.1)), (1, -3.0)]]

    full = deserialize_sample_response(codec.encode_sample_response(resp))
    assert full.prompt_logprobs[0] is None and full.prompt_logprobs[1] == -1.0
    assert full.topk_prompt_logprobs_np is not None and full.topk_prompt_logprobs[1] == [(3, -0.5), (4, -1.0)]


def test_normalize_metrics_always_name_colon_reduction():
    m = codec.normalize_metrics({"a": 1, "b:sum": 2, "c:weird": 3, "d:e:max": 4, "bad": "x"})
    assert m == {"a:mean": 1.0, "b:sum": 2.0, "c_weird:mean": 3.0, "d_e:max": 4.0}
    for k in m:
        assert k.count(":") == 1 and k.split(":")[1] in codec.METRIC_REDUCTIONS


def test_nan_prompt_logprob_is_unscored():
    raw = codec.encode_sample_response({"sequences": [], "prompt_logprobs": [None, -1.0]})
    msg = pb.SampleResponse()
    msg.ParseFromString(raw)
    vals = np.frombuffer(msg.prompt_logprobs, dtype=np.float32)
    assert math.isnan(vals[0]) and vals[1] == -1.0
