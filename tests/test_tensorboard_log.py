"""TensorBoard view of a fit: per-layer cosines as one bar chart, not one-point scalar charts."""
from __future__ import annotations

import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import weightgen
from weightgen.tensorboard_log import log_fit


def test_log_fit_layer_cosines_are_a_bar_chart(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet")
    target = {k: v.clone() for k, v in model.state_dict().items()}
    weightgen.recast(model, weightgen.preset_config("all", templates=1), init="empty")
    report = weightgen.fit(model, target, "closed_form")
    log_fit(tmp_path, model, report)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "mimicry/layer_cosine" in tags["images"]
    image = events.Images("mimicry/layer_cosine")[0]
    assert image.step == 0 and image.width > 400 and image.height > 200
    # no per-layer scalars with the layer index as "step"
    assert not [t for t in tags["scalars"] if "layer_cosine" in t or t.startswith("mimicry/cosine/")]
    assert [e.value for e in events.Scalars("mimicry/mean_cosine")] == [
        torch.tensor(report["mean_cosine"], dtype=torch.float32).item()]
