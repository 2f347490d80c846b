"""The typed config: reference parameter counts, feature-map shapes, and refusals that name the
layer or field and say what is allowed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cnn_train.plugins.config import ConvBlock, ModelConfig, TrainConfig, format_validation_error


@pytest.mark.parametrize(
    ("architecture", "parameters"),
    [pytest.param("cnn", 421_642, id="lesson-cnn"), pytest.param("dense", 101_770, id="previous-lesson-dense")],
)
def test_reference_parameter_counts(architecture, parameters):
    assert ModelConfig(architecture=architecture).parameter_count() == parameters


def test_reference_feature_map_shapes():
    assert ModelConfig().feature_map_shapes() == [
        ("conv1", (28, 28, 32)),
        ("pool1", (14, 14, 32)),
        ("conv2", (14, 14, 64)),
        ("pool2", (7, 7, 64)),
    ]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        pytest.param([{"filters": 8}] * 5, "pool5 (size 2) would turn a 1x1 map into 0x0", id="five-pools-on-28x28"),
        pytest.param(
            [{"filters": 8, "kernel_size": 30, "padding": "valid"}],
            "conv1 (kernel 30, stride 1, padding 'valid') would turn a 28x28 input into -1x-1",
            id="kernel-larger-than-image",
        ),
        pytest.param([{"filters": 8, "stride": 2}], "padding='same' needs stride=1", id="same-with-stride"),
        pytest.param([{"filters": 0}], "filters", id="zero-filters"),
    ],
)
def test_configs_that_cannot_be_built_are_refused(blocks, message):
    with pytest.raises(ValidationError) as caught:
        ModelConfig.model_validate({"conv_blocks": blocks})
    assert message in format_validation_error(caught.value)


def test_unknown_architecture_lists_the_allowed_ones():
    with pytest.raises(ValidationError) as caught:
        ModelConfig(architecture="resnet")
    assert "architecture: Input should be 'cnn', 'dense' or 'cnn-improved' (got 'resnet')" == format_validation_error(caught.value)


def test_a_message_that_quotes_the_value_is_not_followed_by_it_again():
    from cnn_train.flows.params import validate_parameters

    with pytest.raises(Exception) as caught:
        validate_parameters(train_device="cuda:x")
    assert str(caught.value).endswith("train_device: invalid device request 'cuda:x'; expected 'cpu', 'gpu-preferred', "
                                      "'gpu-required' or 'cuda:N' (N a GPU index, e.g. 'cuda:0')")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param("learning_rate", float("nan"), "learning_rate", id="nan-learning-rate"),
        pytest.param("learning_rate", float("inf"), "finite", id="infinite-learning-rate"),
        pytest.param("epochs", 0, "greater than or equal to 1", id="zero-epochs"),
        pytest.param("batch_size", 0, "greater than or equal to 1", id="zero-batch"),
    ],
)
def test_train_config_refusals_name_the_field(field, value, message):
    with pytest.raises(ValidationError) as caught:
        TrainConfig(**{field: value})
    text = format_validation_error(caught.value)
    assert text.startswith(field) and message in text


def test_custom_block_counts_follow_the_formula():
    config = ModelConfig(conv_blocks=(ConvBlock(filters=8, kernel_size=5, padding="valid", pool_size=0),), dense_units=16)
    # conv 5*5*1*8+8, then 24*24*8 flattened into 16 units, then 16*10+10
    assert config.parameter_count() == (5 * 5 * 8 + 8) + (24 * 24 * 8 * 16 + 16) + (16 * 10 + 10)
