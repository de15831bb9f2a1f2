"""Tests for diffusion.writers and diffusion.images: events read back by tensorboard."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2

from diffusion import images
from diffusion.writers import MetricWriter, Progress, flatten_dict, format_duration


def _accumulator(logdir):
    acc = ea.EventAccumulator(str(logdir), size_guidance={
        ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_scalars_images_text_hparams_read_back(tmp_path):
    rng = np.random.default_rng(0)
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(1, {"train/loss": 0.5, "train/lr": np.float32(1e-4)})
        w.write_scalars(2, {"train/loss": 0.25})
        w.write_images(2, {
            "samples/ema": rng.uniform(-1, 1, (5, 8, 6, 3)).astype(np.float32),
            "samples/gray": rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32),
            "single": np.full((7, 9, 3), 200, np.uint8),
        })
        w.write_text(3, "notes", "resumed from step 2")
        w.write_hparams({"model": {"ch": 64, "mults": (1, 2)}, "lr": 1e-3, "ema": True,
                         "name": "ddpm", "extra": None}, metric_tags=("train/loss",))
        w.flush()

    acc = _accumulator(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 0.5), (2, 0.25)]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-4)

    ema = acc.Images("samples/ema")[0]
    assert ema.step == 2
    # 5 images of 8x6, 3 per row: 2 rows -> H' = 2*8 + 3*2, W' = 3*6 + 4*2.
    assert (ema.height, ema.width) == (22, 26)
    decoded = np.asarray(Image.open(io.BytesIO(ema.encoded_image_string)))
    assert decoded.shape == (22, 26, 3)
    assert (acc.Images("single")[0].height, acc.Images("single")[0].width) == (7, 9)
    assert acc.Images("samples/gray")[0].height == 2 * 8 + 3 * 2

    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("notes")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[0]
    assert text.step == 3 and text.tensor_proto.string_val[0] == b"resumed from step 2"

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    hp = start.hparams
    assert hp["model.ch"].number_value == 64
    assert hp["model.mults"].string_value == "(1, 2)"
    assert hp["lr"].number_value == pytest.approx(1e-3)
    assert hp["ema"].bool_value is True
    assert hp["name"].string_value == "ddpm"
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["train/loss"]

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in lines] == [
        {"step": 1, "train/loss": 0.5, "train/lr": pytest.approx(1e-4)},
        {"step": 2, "train/loss": 0.25}]


def test_jsonl_appends_on_resume_and_disabled_writes_nothing(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(1, {"a": 1.0})
    with MetricWriter(str(tmp_path)) as w:
        w.write_scalars(2, {"a": float("nan")})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and np.isnan(rows[1]["a"])

    off = tmp_path / "off"
    w = MetricWriter(str(off), enabled=False)
    w.write_scalars(1, {"a": 1.0})
    w.write_images(1, {"x": np.zeros((2, 4, 4, 3), np.float32)})
    w.write_text(1, "t", "x")
    w.write_hparams({"a": 1})
    w.flush()
    w.close()
    assert not off.exists()


def test_bad_image_shape_is_rejected(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError, match="got shape"):
            w.write_images(0, {"x": np.zeros((4, 4), np.float32)})


def test_flatten_dict():
    assert flatten_dict({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {
        "a.b": 1, "a.c.d": "x", "e": 2}


def test_make_grid_shapes_values_and_png(tmp_path):
    x = np.zeros((7, 4, 5, 3), np.float32)
    x[0] = 1.0
    x[1] = -1.0
    g = images.make_grid(x, padding=1)  # nrow = ceil(sqrt 7) = 3 -> 3 rows
    assert g.dtype == np.uint8 and g.shape == (3 * 4 + 4, 3 * 5 + 4, 3)
    assert (g[1:5, 1:6] == 255).all()  # image 0
    assert (g[1:5, 7:12] == 0).all()  # image 1
    assert (g[1:5, 13:18] == 128).all()  # image 2, value 0 -> mid-grey
    assert (g[0] == 0).all() and (g[:, 0] == 0).all()  # padding
    assert images.make_grid(x, nrow=7, padding=0).shape == (4, 35, 3)
    assert images.make_grid(x, nrow=20, padding=0).shape == (4, 35, 3)  # nrow capped at N
    assert images.make_grid(x, nrow=2, padding=2).shape == (4 * 4 + 5 * 2, 2 * 5 + 3 * 2, 3)

    u = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    gu = images.make_grid(u, padding=0)
    assert gu.shape == (3, 6, 1)
    np.testing.assert_array_equal(gu[:, :3, 0], u[0, ..., 0])  # uint8 passes unchanged

    for name, grid in (("rgb.png", g), ("gray.png", gu)):
        path = tmp_path / "sub" / name
        images.save_png(str(path), grid)
        back = np.asarray(Image.open(path))
        np.testing.assert_array_equal(back.reshape(grid.shape), grid)


def test_image_errors():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        images.make_grid(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="dtype int32"):
        images.make_grid(np.zeros((1, 4, 4, 3), np.int32))
    with pytest.raises(TypeError, match="uint8"):
        images.save_png("/tmp/never.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="nrow"):
        images.make_grid(np.zeros((2, 4, 4, 3), np.float32), nrow=0)


def test_progress_format_and_eta_excludes_compile():
    now = [0.0]
    lines = []
    p = Progress(3000, smoothing=0.5, print_fn=lines.append, clock=lambda: now[0])
    now[0] = 100.0  # the first update comes after a long compile
    first = p.update(1, {"loss": 0.5})
    assert first == "step 1/3000 loss 0.5 -- steps/s ETA --"
    now[0] = 100.0 + 99 / 3.4
    line = p.update(100, {"loss": 0.0312})
    # 2900 steps at 3.4 steps/s = 853 s; the 100 s compile is not in the rate.
    assert line == "step 100/3000 loss 0.0312 3.4 steps/s ETA 14m13s"
    now[0] += 100 / 1.4  # slower: the smoothed rate is between 3.4 and 1.4
    p.update(200, {"loss": 0.03})
    assert p.rate == pytest.approx(0.5 * 3.4 + 0.5 * 1.4)
    assert lines[-1].startswith("step 200/3000 loss 0.03 2.4 steps/s ETA 19m27s")
    assert len(lines) == 3


def test_format_duration():
    assert format_duration(842) == "14m02s"
    assert format_duration(3909) == "1h05m09s"
    assert format_duration(42.4) == "42s"


def test_logged_line_is_on_disk_at_once(tmp_path):
    """A SIGKILL right after a log loses nothing: the line is flushed (and fsynced)."""
    w = MetricWriter(str(tmp_path))
    w.write_scalars(7, {"loss": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 7, "loss": 0.5}
    assert _accumulator(tmp_path).Scalars("loss")[0].step == 7
    w.close()


def test_resume_drops_logs_past_the_restored_step(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        for step in range(1, 7):
            w.write_scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # torn by a kill mid-line
    # Resumed from the checkpoint of step 4: steps 5 and 6 are trained again.
    with MetricWriter(str(tmp_path), resume_step=4) as w:
        for step in (5, 6):
            w.write_scalars(step, {"loss": 10.0 * step})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    loss = _accumulator(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]


def test_full_disk_raises_at_once_naming_the_file(tmp_path, monkeypatch):
    """tensorboardX's queue thread died on ENOSPC and the next writes blocked forever."""
    import errno
    import threading
    from tensorboardX import record_writer
    from diffusion.io_errors import WriteFailed

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    w = MetricWriter(str(tmp_path))
    monkeypatch.setattr(record_writer.RecordWriter, "write", enospc)
    result = []

    def log_many():
        try:
            for step in range(50):
                w.write_scalars(step, {"loss": 1.0})
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result.append(e)
    t = threading.Thread(target=log_many, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "writing blocked on a full disk"
    assert result and isinstance(result[0], WriteFailed), result
    msg = str(result[0])
    assert "events.out.tfevents" in msg and "No space left" in msg and "MB free" in msg
    monkeypatch.undo()
    w.close()
