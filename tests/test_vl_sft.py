"""VL SFT: the shapes task trains a tiny model; JSONL records with images; DeepSeek-VL's stages freeze what they should."""

import json

import pytest
import torch

pytest.importorskip("PIL.Image")

from nanoseek.data.shapes import majority_baseline, shape_examples  # noqa: E402
from nanoseek.hf.vl import load_vl  # noqa: E402
from nanoseek.train.vl_sft import VLSFTConfig, vl_sft, with_slots  # noqa: E402


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl")
    report = vl_sft(VLSFTConfig(out=str(out), steps=60, n_train=300, n_eval=24, image_size=32), log=lambda *_: None)
    return out, report


def test_shapes_task_is_deterministic_and_balanced():
    a, b = shape_examples(50, seed=1), shape_examples(50, seed=1)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert majority_baseline(shape_examples(400, seed=2)) < 0.45  # no answer is a safe guess
    written = [e for e in shape_examples(80, seed=3) if e.topic == "text"]
    assert written and {e.answer for e in written} <= {"cat", "dog", "sun", "box"}
    white = [sum(px == (255, 255, 255) for px in e.image.getdata()) for e in written]
    assert min(white) > 20  # the word's box is on the canvas


def test_shapes_training_lowers_the_loss_and_saves_a_loadable_checkpoint(shapes_run):
    out, report = shapes_run
    assert report["loss_last"] < 0.6 * report["loss_first"]
    assert {"accuracy_before", "accuracy_after", "majority_baseline"} <= set(report)
    assert {"all", "colour", "kind", "count", "text"} == set(report["accuracy_after"])
    vl = load_vl(out)
    assert vl.config.model_type == "deepseek_vl_hybrid"
    assert json.loads((out / "report.json").read_text())["steps"] == 60


def test_jsonl_records_and_the_aligner_stage(shapes_run, tmp_path):
    out, _ = shapes_run
    for i, e in enumerate(shape_examples(4, seed=5)):
        e.image.save(tmp_path / f"{i}.png")
    recs = [{"messages": [{"role": "user", "content": f"Look: {'<image_placeholder>'} {e.question}"},
                          {"role": "assistant", "content": e.answer}], "images": [f"{i}.png"]}
            for i, e in enumerate(shape_examples(4, seed=5))]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    before = load_vl(out).state_dict()
    vl_sft(VLSFTConfig(out=str(tmp_path / "aligned"), model=str(out), data=str(tmp_path / "data.jsonl"),
                       stage="aligner", steps=3, batch_size=2), log=lambda *_: None)
    after = load_vl(tmp_path / "aligned").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.aligner.") for k in changed)


def test_image_marks_must_match_the_images():
    msgs = [{"role": "user", "content": "<image_placeholder> and <image_placeholder>?"}]
    assert with_slots(msgs, 2, [9, 9])[0]["content"] == [[9, 9], " and ", [9, 9], "?"]
    assert with_slots([{"role": "user", "content": "hi"}], 1, [9])[0]["content"] == [[9], "hi"]
    with pytest.raises(ValueError, match="2 <image_placeholder> marks for 1 images"):
        with_slots(msgs, 1, [9])
