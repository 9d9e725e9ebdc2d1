"""Config structs check their bounds however they are built."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import mds
from mds._config import warmup_sizes


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: mds.BatchingConfig(max_batch_size=0),
            "Expected `int` >= 1 - at `$.max_batch_size`",
        ),
        (
            lambda: mds.BatchingConfig(max_queue_size=-3),
            "Expected `int` >= 1 - at `$.max_queue_size`",
        ),
        (lambda: mds.ModelConfig(instances=0), "Expected `int` >= 1 - at `$.instances`"),
        (lambda: mds.ModelConfig(timeout=0.0), "Expected `float` > 0.0 - at `$.timeout`"),
        (
            lambda: mds.ModelConfig(drain_timeout=-1),
            "Expected `float` >= 0.0 - at `$.drain_timeout`",
        ),
        (lambda: mds.ModelConfig(devices=()), "Expected `array` of length >= 1 - at `$.devices`"),
        (lambda: mds.ModelConfig(instances="2"), "Expected `int`, got `str` - at `$.instances`"),
        (
            lambda: mds.ModelConfig(warmup_batch_sizes=(0,)),
            "Expected `int` >= 1 - at `$.warmup_batch_sizes[0]`",
        ),
    ],
)
def test_bounds_hold_when_built_in_python(build: Any, message: str) -> None:
    with pytest.raises(mds.ConfigError, match=message.replace("$", r"\$").replace("[", r"\[")):
        build()


def test_bounds_hold_when_decoded_and_errors_name_the_path() -> None:
    with pytest.raises(
        msgspec.ValidationError, match=r"Expected `int` >= 1 - at `\$.batching.max_batch_size`"
    ):
        msgspec.convert({"batching": {"max_batch_size": 0}}, mds.ModelConfig)
    with pytest.raises(msgspec.ValidationError, match=r"Object contains unknown field `batch`"):
        msgspec.convert({"batch": 3}, mds.ModelConfig)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": ("cpu", "GPU 0")}, "ModelConfig.devices\\[1\\]: 'GPU 0' is not a device name"),
        (
            {"warmup_batch_sizes": (1, 64), "batching": mds.BatchingConfig(max_batch_size=8)},
            "warmup_batch_sizes: 64 is larger than batching.max_batch_size \\(8\\)",
        ),
    ],
)
def test_rules_across_fields_hold_both_ways(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(mds.ConfigError, match=message):
        mds.ModelConfig(**fields)
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(msgspec.to_builtins(fields), mds.ModelConfig)


def test_values_are_normalised_to_their_declared_types() -> None:
    config = mds.ModelConfig(
        timeout=2,
        devices=["cpu", "cuda:1"],  # type: ignore[arg-type]
        warmup_batch_sizes=[4, 1],  # type: ignore[arg-type]
        batching=mds.BatchingConfig(max_batch_size=4),
    )
    assert config.timeout == 2.0 and isinstance(config.timeout, float)
    assert config.devices == ("cpu", "cuda:1")
    assert warmup_sizes(config) == (1, 4)


def test_configs_are_frozen_and_round_trip() -> None:
    config = mds.ModelConfig(instances=2, parameters={"threshold": 0.5})
    with pytest.raises(AttributeError):
        config.instances = 3  # type: ignore[misc]
    assert msgspec.convert(msgspec.to_builtins(config), mds.ModelConfig) == config


def test_device_names() -> None:
    assert mds.Device.parse("cuda:1") == mds.Device(kind="cuda", index=1)
    assert mds.Device.parse("cpu").name == "cpu"
    assert str(mds.Device(kind="mps")) == "mps"
    with pytest.raises(ValueError, match="'cuda:' is not a device name"):
        mds.Device.parse("cuda:")
