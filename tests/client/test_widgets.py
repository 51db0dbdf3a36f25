"""LiveCurve / SampleViewer: widget model state, Stop button, text fallback, DataFrames."""

from __future__ import annotations

import pandas as pd
import pytest

from twinkle.types import SampledSequence, SampleResponse
from twinkle_client.widgets import LiveCurve, SampleViewer, render_sample_html, runs_frame, svg_curve


def test_widget_state_receives_every_step():
    curve = LiveCurve(metrics=("loss",), mode="widget", throttle_s=0.0, display=False)
    for step in range(1, 6):
        curve.log({"loss": 1.0 / step, "lr": 0.1}, step=step, run="a")
        state = curve.widget.get_state()
        assert [p["step"] for p in state["data"]["a"]] == list(range(1, step + 1))
        assert state["data"]["a"][-1]["loss"] == 1.0 / step
        assert f"a: {1.0 / step:.4g}" in curve.chart.value
    curve.log({"loss": 2.0}, step=1, run="b")  # a second run is overlaid
    assert set(curve.widget.get_state()["data"]) == {"a", "b"}
    assert curve.chart.value.count("<polyline") == 2 and "b: 2" in curve.chart.value


def test_throttle_skips_redraws_but_close_flushes():
    curve = LiveCurve(mode="widget", throttle_s=3600, display=False)
    for s in range(10):
        curve.log({"loss": float(10 - s)}, step=s)
    assert len(curve.widget.data.get("default", [])) <= 1  # only the first draw happened
    curve.close()
    assert len(curve.widget.data["default"]) == 10


def test_stop_button_ends_loop_after_current_step():
    curve = LiveCurve(mode="widget", throttle_s=0.0, display=False)
    done = []
    for i in curve.range(100):
        done.append(i)  # the "step"
        if i == 3:
            curve.stop_button.click()  # pressed while step 3 runs
        curve.log({"loss": 1.0}, step=i)
    assert done == [0, 1, 2, 3]  # step 3 completed, nothing after it
    assert [p["step"] for p in curve.widget.data["default"]] == [0, 1, 2, 3]
    assert curve.stop_button.disabled


def test_text_mode_uses_tqdm(capsys):
    curve = LiveCurve(metrics=("loss",), mode="text", title="sft")
    for i in curve.range(3):
        curve.log({"loss": 3.0 - i}, step=i)
    err = capsys.readouterr().err
    assert "sft" in err and "3/3" in err and "loss=1" in err
    df = curve.frame()
    assert isinstance(df, pd.DataFrame) and list(df["loss"]) == [3.0, 2.0, 1.0]


def test_sample_viewer_heatmap_and_reward(capsys):
    html = render_sample_html("2+2=", ["4", "<eos>"], [-0.01, -3.0], reward=1.0, title="s0")
    assert "reward <b>1</b>" in html and "logprob -0.010" in html and "logprob -3.000" in html
    assert html.index("rgb(20") > 0  # a confident token is green-ish
    v = SampleViewer(mode="widget", display=False)
    resp = SampleResponse(sequences=[SampledSequence(stop_reason="stop", tokens=[5, 6], logprobs=[-0.1, -0.2])])
    v.add_response([1, 2], resp, rewards=[0.5])
    assert "reward <b>0.5</b>" in v.widget.value and "⟨5⟩" in v.widget.value
    assert v.widget.value.startswith("<table class='twk-samples'>") and "<td>-0.150</td>" in v.widget.value
    t = SampleViewer(mode="text")
    t.add("hi", [7], [-0.5], reward=0.0)
    assert "'hi' -> '⟨7⟩' reward=0 mean_logprob=-0.500" in capsys.readouterr().out
    assert list(t.frame()["reward"]) == [0.0]


def test_frames_and_svg():
    from twinkle.types.api import RunInfo

    r = RunInfo(run_id="s:train:0", session_id="s", user="u", base_model="m", lora={"rank": 4}, state="active",
                step=3, created_at=0.0, last_metrics={"loss": 0.5})
    df = runs_frame([r])
    assert df.loc[0, "rank"] == 4 and df.loc[0, "loss"] == 0.5
    assert "waiting for the first step" in svg_curve({})


def test_frames_show_times_as_datetimes_and_the_mean_loss():
    import datetime as dt

    from twinkle.types import LoraConfig
    from twinkle.types.api import RunInfo
    from twinkle_client.widgets import checkpoints_frame

    r = RunInfo(run_id="r1", session_id="s", user="u", base_model="m", lora=LoraConfig(rank=4), state="active",
                step=3, created_at=1_700_000_000.5, last_request_time=1_700_000_060.0,
                last_metrics={"loss:sum": 586.5, "loss": 1.943, "grad_norm:mean": 0.5})
    df = runs_frame([r])
    assert df.loc[0, "loss"] == 1.943 and df.loc[0, "grad_norm"] == 0.5
    assert df.loc[0, "created"] == dt.datetime.fromtimestamp(1_700_000_000)
    assert (df.loc[0, "last_active"] - df.loc[0, "created"]).total_seconds() == 60
    ck = checkpoints_frame([{"run_id": "r1", "name": "a", "kind": "training", "step": 3, "path": "p",
                             "created_at": 1_700_000_000.0}])
    assert isinstance(ck.loc[0, "created"], dt.datetime) and "created_at" not in ck.columns


def _png_size(data: bytes) -> tuple[int, int]:
    import struct

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_one_panel_per_metric_smoothing_log_and_hover():
    import re

    from twinkle_client import _charts

    hist = {"dpo": [{"step": s, "loss": 0.69 / s, "margin": 2.0 * s, "accuracy": min(1.0, 0.5 + s / 20)}
                    for s in range(1, 11)]}
    panels = _charts.layout(hist, ("loss", "margin", "accuracy", "absent"), log_y=("loss",))
    assert [p.metric for p in panels] == ["loss", "margin", "accuracy"] and panels[0].log and not panels[1].log
    svg = _charts.svg_chart(panels, title="DPO", smoothing=0.6)
    assert svg.count("class='twk-panel-title'") == 3  # three y-axes, not one
    assert "(log)" in svg
    assert svg.count("stroke-opacity='0.25'") == 3  # raw points faint under the smoothed line
    tips = re.findall(r"<title>([^<]+)</title>", svg)
    assert "dpo · step 10 · margin 20 (smoothed" in " ".join(tips)
    w, h = _png_size(_charts.png_chart(panels, title="DPO"))
    assert w == 720 and h > 150
    assert _charts.smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no ramp from 0
    assert _charts.smooth([0.0, 10.0], 0.5)[1] == pytest.approx(10 * 0.5 / 0.75)


def test_curve_ends_as_a_png_with_rate_and_eta(monkeypatch):
    import base64

    curve = LiveCurve(metrics=("loss",), mode="widget", throttle_s=0.0, display=False, total=10)
    updates = []

    class Handle:
        def update(self, obj, raw=False):
            updates.append((obj, raw))

    curve._handle = Handle()
    for i in curve.iterate(list(range(4))):  # 4 of the 10 steps
        curve.log({"loss": 4.0 - i}, step=i + 1)
    sps, left = curve.rate()
    assert sps > 0 and left == pytest.approx(6 / sps)
    assert "steps/s" in curve.chart.value
    (bundle, raw), = updates  # at the end the widget output is replaced by a static picture
    assert raw and set(bundle) == {"image/png", "text/plain"}
    assert _png_size(base64.b64decode(bundle["image/png"]))[0] == 720
    assert "4 steps" in bundle["text/plain"]


def test_log_to_needs_the_package():
    from twinkle.types import InvalidInputError

    with pytest.raises(InvalidInputError, match="log_to='nope'|use one of"):
        LiveCurve(mode="text", log_to="nope")


def test_sample_viewer_shows_prompt_images_beside_the_answer(capsys):
    """Issue 14: a prompt that carried images shows them in the samples table, inlined as data URIs (the saved
    notebook shows them anywhere); a chunk that is not a known image format / not base64 is not inlined."""
    import base64

    from twinkle.types import EncodedTextChunk, ImageChunk, ModelInput
    from twinkle_client.widgets import SampleViewer, image_data_uri

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
    prompt = ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2]), ImageChunk(data=png, format="png", expected_tokens=4),
                                EncodedTextChunk(tokens=[3])])
    v = SampleViewer(mode="widget", display=False)
    v.add(prompt, [7, 8], [-0.1, -2.0], reward=1.0, title="sample 0")
    html_out = v.widget.value
    assert f"<img src='data:image/png;base64,{png}'" in html_out
    assert html_out.index("<img") < html_out.index("⟨7⟩")  # the image sits before (beside) the answer
    assert "[1, 2][image][3]" in html_out
    assert v.samples[0]["images"] == [f"data:image/png;base64,{png}"]
    assert image_data_uri(ImageChunk(data=png, format="svg+xml")) is None  # no script-capable formats
    assert image_data_uri(ImageChunk(data="not base64 <script>", format="png")) is None
    t = SampleViewer(mode="text", display=False)
    t.add(prompt, [7], None)
    assert "[1 image]" in capsys.readouterr().out


class _Handle:
    """Stands in for IPython's display handle: records every redraw."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def update(self, obj) -> None:
        self.shown.append(obj.data)


def _events(final: SampleResponse):
    for i, seq in enumerate(final.sequences):
        for t, lp in zip(seq.tokens, seq.logprobs or [], strict=True):
            yield {"index": i, "token": t, "logprob": lp, "text": f"<{t}>"}
    yield {"done": final}


def test_sample_viewer_fills_a_streamed_sample_in_live():
    final = SampleResponse(sequences=[SampledSequence(stop_reason="length", tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3]),
                                      SampledSequence(stop_reason="length", tokens=[8], logprobs=[-1.0])])
    v = SampleViewer(mode="widget", display=False)
    v._handle = _Handle()
    got = v.add_stream([1, 2], _events(final), rewards=[1.0, 0.0], refresh_s=0.0)
    assert got is final
    partial = [h for h in v._handle.shown if "&lt;5&gt;" in h and "&lt;7&gt;" not in h]
    assert partial, "the row was drawn before its last token arrived"
    assert len(v._handle.shown) >= 4  # a redraw per token (refresh 0) and a last one
    last = v._handle.shown[-1]
    assert "⟨7⟩" in last and "&lt;7&gt;" not in last  # the final response's tokens replace the streamed pieces
    assert [s["tokens"] for s in v.samples] == [[5, 6, 7], [8]] and [s["reward"] for s in v.samples] == [1.0, 0.0]
    assert "reward <b>1</b>" in last and "<td>-0.200</td>" in last


def test_sample_viewer_streams_text_pieces_in_text_mode(capsys):
    final = SampleResponse(sequences=[SampledSequence(stop_reason="length", tokens=[5, 6], logprobs=[-0.1, -0.2])])
    t = SampleViewer(mode="text")
    assert t.add_stream("hi", _events(final)) is final
    assert capsys.readouterr().out == "<5><6>\n"
    assert t.samples[0]["pieces"] == ["⟨5⟩", "⟨6⟩"]  # the final response's tokens, decoded by the viewer
