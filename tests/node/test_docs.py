"""The README's configuration reference is the one generated from the settings model."""

from pathlib import Path

from node.config import reference_markdown


def test_readme_configuration_reference_is_current() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert reference_markdown() in readme, "run `spine-node config` and paste it into README.md"
