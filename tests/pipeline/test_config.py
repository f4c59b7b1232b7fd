"""Settings: the shipped YAML mirrors the defaults, overrides layer correctly, errors are one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import Settings, dotted_overrides, env_overrides, load_settings
from pipeline.errors import ConfigError
from tests.pipeline.helpers import DoesNotRaise

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def _dump(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def _without(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A deep copy of a model_dump with one dotted field removed."""
    out: dict[str, Any] = {k: (_without(v, "") if isinstance(v, dict) else v) for k, v in tree.items()}
    if dotted:
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        del node[leaf]
    return out


def _get(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_default_yaml_equals_builtin_defaults() -> None:
    assert DEFAULT_YAML.is_file()
    assert _dump(load_settings(DEFAULT_YAML, environ={})) == _dump(Settings())


def test_no_file_no_env_gives_defaults() -> None:
    assert load_settings(None, environ={}) == Settings()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_yaml_gives_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert load_settings(path, environ={}) == Settings()


def test_vapipe_config_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("group_prefix: from-file\n")
    assert load_settings(None, environ={"VAPIPE_CONFIG": str(path)}).group_prefix == "from-file"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {}),
        ({"VAPIPE_INTER__REPLICAS": "3"}, {"inter": {"replicas": 3}}),
        ({"VAPIPE_KAFKA__BOOTSTRAP_SERVERS": "198.18.0.5:9092"}, {"kafka": {"bootstrap_servers": "198.18.0.5:9092"}}),
        ({"VAPIPE_PRODUCER__MAX_FRAMES": "null"}, {"producer": {"max_frames": None}}),
        ({"VAPIPE_SHARED": "/x", "VAPIPE_CONFIG": "/y.yaml", "PATH": "/bin"}, {}),
        ({"vapipe_inter__replicas": "3"}, {}),  # prefix is case-sensitive
    ],
)
def test_env_overrides(environ: dict[str, str], expected: dict[str, Any]) -> None:
    assert env_overrides(environ) == expected


@pytest.mark.parametrize(
    ("pairs", "expected", "exception"),
    [
        (["inter.replicas=3"], {"inter": {"replicas": 3}}, DoesNotRaise()),
        (
            ["inter.replicas=3", "crop.num_cpus=0.5", "output_dir=/data/out"],
            {"inter": {"replicas": 3}, "crop": {"num_cpus": 0.5}, "output_dir": "/data/out"},
            DoesNotRaise(),
        ),
        (["counting.labels=[car, bus]"], {"counting": {"labels": ["car", "bus"]}}, DoesNotRaise()),
        (["ray.address=null"], {"ray": {"address": None}}, DoesNotRaise()),
        (["model.name=sleep:5ms"], {"model": {"name": "sleep:5ms"}}, DoesNotRaise()),
        (["inter.replicas"], None, pytest.raises(ConfigError, match="inter.replicas")),
        (["=3"], None, pytest.raises(ConfigError, match="expected section.field=value")),
    ],
)
def test_dotted_overrides(pairs: list[str], expected: dict[str, Any] | None, exception: Any) -> None:
    with exception:
        assert dotted_overrides(pairs) == expected


@pytest.mark.parametrize("with_file", [True, False], ids=["default-yaml", "no-file"])
@pytest.mark.parametrize(
    ("environ", "field", "value"),
    [
        ({"VAPIPE_INTER__REPLICAS": "3"}, "inter.replicas", 3),
        ({"VAPIPE_CROP__REPLICAS": "2"}, "crop.replicas", 2),
        ({"VAPIPE_KAFKA__BOOTSTRAP_SERVERS": "198.18.0.5:9092"}, "kafka.bootstrap_servers", "198.18.0.5:9092"),
        ({"VAPIPE_TOPICS__FRAMES__PARTITIONS": "12"}, "topics.frames.partitions", 12),
    ],
)
def test_env_override_changes_only_its_field(environ: dict[str, str], field: str, value: Any, with_file: bool) -> None:
    # Whether or not a YAML file restates the defaults, VAPIPE_X__Y changes x.y and nothing else.
    settings = load_settings(DEFAULT_YAML if with_file else None, environ=environ)
    assert _get(settings, field) == value
    assert _without(_dump(settings), field) == _without(_dump(Settings()), field)


@pytest.mark.parametrize(
    ("pairs", "field", "value"),
    [
        (["inter.replicas=3"], "inter.replicas", 3),
        (["count.batch_size=128"], "count.batch_size", 128),
        (["topics.counts_changelog.partitions=12"], "topics.counts_changelog.partitions", 12),
    ],
)
def test_flag_override_changes_only_its_field(pairs: list[str], field: str, value: Any) -> None:
    settings = load_settings(None, overrides=dotted_overrides(pairs), environ={})
    assert _get(settings, field) == value
    assert _without(_dump(settings), field) == _without(_dump(Settings()), field)


def test_priority_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inter:\n  replicas: 2\n  batch_size: 4\ncrop:\n  replicas: 2\n")
    settings = load_settings(
        path,
        overrides=dotted_overrides(["inter.replicas=5"]),
        environ={"VAPIPE_INTER__REPLICAS": "3", "VAPIPE_CROP__REPLICAS": "4"},
    )
    assert (settings.inter.replicas, settings.inter.batch_size, settings.crop.replicas) == (5, 4, 4)


@pytest.mark.parametrize(
    ("environ", "field", "text"),
    [
        ({"VAPIPE_KAFKA__SASL_PASSWORD": "12345"}, "kafka.sasl_password", "12345"),
        ({"VAPIPE_KAFKA__SASL_USERNAME": "2024"}, "kafka.sasl_username", "2024"),
        ({"VAPIPE_GROUP_PREFIX": "2024"}, "group_prefix", "2024"),
    ],
)
def test_env_string_fields_keep_numeric_looking_text(environ: dict[str, str], field: str, text: str) -> None:
    # Environment values are always text; a password or a prefix made of digits is still a string.
    value = _get(load_settings(None, environ=environ), field)
    assert (value.get_secret_value() if hasattr(value, "get_secret_value") else value) == text


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("inter:\n  replicas: 0\n", "inter.replicas"),
        ("inter:\n  replicas: many\n", "inter.replicas"),
        ("crops:\n  min_confidence: 1.5\n", "crops.min_confidence"),
        ("kafka:\n  compression_type: brotli\n", "kafka.compression_type"),
        ("counting:\n  labels: []\n", "counting.labels"),
        ("broker:\n  port: 70000\n", "broker.port"),
        ("topics:\n  frames:\n    name: ''\n", "topics.frames.name"),
        ("inter: 3\n", "inter"),
        ("inter:\n  replicas: 0\n  batch_size: 0\n", "inter.replicas"),
        ('producer:\n  jpeg_quality: "50\\n60"\n', "producer.jpeg_quality"),
    ],
)
def test_invalid_value_is_one_line_naming_field_and_file(tmp_path: Path, yaml_text: str, field: str) -> None:
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert f"{field}:" in message
    assert str(path) in message


def test_invalid_env_value_names_field_and_environment() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(DEFAULT_YAML, environ={"VAPIPE_INTER__REPLICAS": "0"})
    message = str(info.value)
    assert "\n" not in message
    assert "inter.replicas" in message
    assert str(DEFAULT_YAML) in message and "VAPIPE_" in message


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("bogus: 1\n", "bogus"),
        ("inter:\n  replica: 3\n", "inter.replica"),
        ("kafka:\n  bootstrap: x:9092\n", "kafka.bootstrap"),
    ],
)
def test_unknown_field_rejected(tmp_path: Path, yaml_text: str, field: str) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match="Extra inputs are not permitted") as info:
        load_settings(path, environ={})
    assert f"{field}:" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_env_field_rejected() -> None:
    with pytest.raises(ConfigError, match="inter.replica: Extra inputs"):
        load_settings(None, environ={"VAPIPE_INTER__REPLICA": "3"})


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("inter:\n  replicas: [1\n", "invalid YAML in .* line 3"),
        ("inter:\n\treplicas: 3\n", "invalid YAML in .* line 2"),
        ("a: b: c\n", "invalid YAML in "),
        ("- a\n- b\n", "top level must be a mapping, got list"),
        ("just text\n", "top level must be a mapping, got str"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path: Path, yaml_text: str, match: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["missing.yaml", "no/such/dir/c.yaml"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path, environ={})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.inter.replicas = 5  # type: ignore[misc]
    assert settings.group("count") == "vapipe-count"
