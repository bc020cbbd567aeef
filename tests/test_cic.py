"""The cell-identity-code family: model shapes and sizes, the classifier variant, config
validation, and what the task reads from (and refuses in) the records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ish_tf.data.inputs import InputSpec
from ish_tf.families import ModelConfig, build_model, get_family, make_task
from ish_tf.families.cic.config import CicConfig
from ish_tf.families.testing import tiny_records
from ish_tf.train import TrainConfig


def test_paper_defaults_and_registry():
    c = CicConfig().validate()
    assert (c.hidden, c.activation, c.code_size, c.batch_size) == ((2000,), "log_sigmoid", 30, 32)
    assert get_family("cic").outputs == ("code", "reconstruction")
    assert get_family("cic_classifier").outputs == ("code", "reconstruction", "probabilities")
    assert get_family("cic_classifier").prefix == "cic"
    assert get_family("cic").inputs.kind == "vector"


def test_autoencoder_shapes_and_parameter_count():
    """D=50, hidden (20, 10), code 4: encoder 50*20+20 + 20*10+10 + 10*4+4 = 1274, decoder
    4*10+10 + 10*20+20 + 20*50+50 = 1320; 2594 in all."""
    model = build_model(ModelConfig("cic", seed=0, family=CicConfig(
        hidden=(20, 10), code_size=4, dim=50, activation="tanh")))
    assert model.count_params() == 2594
    code, recon = model(np.zeros((3, 50), np.float32))
    assert code.shape == (3, 4) and recon.shape == (3, 50)
    assert [layer.name for layer in model.layers if layer.name in ("code", "reconstruction")] == [
        "code", "reconstruction"]
    # The paper's default: one hidden layer of 2000 units.
    default = build_model(ModelConfig("cic", family=CicConfig(dim=765)))
    assert default.count_params() == (765 * 2000 + 2000 + 2000 * 30 + 30) + (
        30 * 2000 + 2000 + 2000 * 765 + 765)


def test_classifier_outputs_probabilities_with_at_most_one_hidden_layer():
    family = CicConfig(hidden=(8,), code_size=3, dim=6, classes=("a", "b", "c"),
                       classifier_hidden=5)
    model = build_model(ModelConfig("cic_classifier", seed=1, family=family))
    code, recon, probs = model(np.ones((2, 6), np.float32))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    assert model.get_layer("classifier_dense").units == 5
    direct = build_model(ModelConfig("cic_classifier", family=dataclasses.replace(
        family, classifier_hidden=0)))
    assert "classifier_dense" not in [layer.name for layer in direct.layers]
    with pytest.raises(ValueError, match=">= 2 classes"):
        build_model(ModelConfig("cic_classifier", family=CicConfig(dim=6, code_size=3)))


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=0), "--cic_batch_size"),
    (dict(hidden=(10, 0)), "--cic_hidden"),
    (dict(code_size=0), "--cic_code_size"),
    (dict(activation="gelu"), "--cic_activation"),
])
def test_validate_names_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        CicConfig(**bad).validate()


def test_model_needs_its_dimension():
    with pytest.raises(ValueError, match="input dimension"):
        build_model(ModelConfig("cic", family=CicConfig()))


def test_task_reads_dimension_and_classes_and_refuses_images(tmp_path):
    vectors = tiny_records(str(tmp_path / "v"), InputSpec.vector(7))
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), records_dir=vectors)
    model_config = ModelConfig("cic_classifier", family=CicConfig(hidden=(4,), code_size=2))
    task = make_task(model_config, cfg)
    assert task.model_config.family.dim == 7 and task.model_config.family.classifier
    assert task.model_config.family.classes == ("G0", "G1", "G2", "G3", "T0", "T1")
    batch = next(iter(task.make_dataset()))
    assert batch[0].shape == (32, 7)
    with pytest.raises(ValueError, match="takes 9 genes but .* vectors of 7"):
        make_task(ModelConfig("cic", family=CicConfig(dim=9)), cfg)
    images = tiny_records(str(tmp_path / "i"), InputSpec.image(1, 8, 8))
    with pytest.raises(ValueError, match="expression vectors"):
        make_task(ModelConfig("cic", family=CicConfig()),
                  dataclasses.replace(cfg, records_dir=images))
    with pytest.raises(ValueError, match="--model=cic_classifier"):
        make_task(ModelConfig("cic", family=CicConfig(classifier=True)), cfg)
