"""The documentation a user follows: the README's first commands, the generated configuration
reference, `.env.example`, and the links between the pages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dataverse_assets import config
from dataverse_assets.config import _ENV_FIELDS, PROJECT_ROOT, Settings, load_settings
from dataverse_assets.ops import config_reference
from dataverse_assets.sync.stage import staging_workers

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
# [text](target) outside code; images too.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
ASSIGNMENT = re.compile(r"^(#\s*)?(DATAVERSE_[A-Z0-9_]+)=(.*)$")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _assignments(text: str) -> dict[str, tuple[bool, str]]:
    """Variable -> (commented out, example value) for each `NAME=value` line."""
    found = {}
    for line in text.splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            found[match[2]] = (bool(match[1]), match[3])
    return found


def test_the_configuration_reference_is_the_generated_one():
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference.render(), (
        "docs/configuration.md differs from what config.py generates; regenerate it: "
        f"{config_reference.REGENERATE}")


def test_every_environment_variable_is_in_env_example_and_the_reference():
    example = _assignments(ENV_EXAMPLE.read_text(encoding="utf-8"))
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    read = config_reference.environment_variables()
    assert set(_ENV_FIELDS) <= set(read)
    missing_example = [v for v in read if v not in example]
    missing_reference = [v for v in read if f"| `{v}` |" not in reference]
    assert not missing_example, f".env.example lacks {missing_example}"
    assert not missing_reference, f"docs/configuration.md lacks {missing_reference}"
    assert not set(example) - set(read), ".env.example names a variable nothing reads"


# Read by the package but not for users: the tests' fault injection points.
INTERNAL_VARIABLES = {"DATAVERSE_FAULT_POINTS"}


def test_every_variable_the_package_names_is_documented():
    """Any `"DATAVERSE_..."` the code reads (Settings, alerts, staging workers...) is in the
    reference, so a new variable cannot go undocumented."""
    named = set()
    for path in (PROJECT_ROOT / "dataverse_assets").rglob("*.py"):
        named |= set(re.findall(r'"(DATAVERSE_[A-Z0-9_]+)"', path.read_text(encoding="utf-8")))
    undocumented = named - set(config_reference.environment_variables()) - INTERNAL_VARIABLES
    assert not undocumented, f"not in docs/configuration.md or .env.example: {undocumented}"


def test_env_example_filled_in_as_env_loads_into_settings(tmp_path, monkeypatch):
    """`cp .env.example .env`, fill in the org, uncomment every optional default: it loads,
    through python-dotenv as load_settings does, and each default it shows is the real one."""
    filled = {"DATAVERSE_URL": "https://contoso.crm.dynamics.com",
              "DATAVERSE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
              "DATAVERSE_CLIENT_ID": "00000000-0000-0000-0000-000000000002",
              "DATAVERSE_CLIENT_SECRET": "a-client-secret-value"}
    lines = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            line = f"{match[2]}={filled.get(match[2], match[3])}"
        lines.append(line)
    (tmp_path / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if not k.startswith("DATAVERSE_")})

    settings = load_settings()

    assert settings.source == "live"
    assert settings.url == filled["DATAVERSE_URL"]
    assert settings.client_id == filled["DATAVERSE_CLIENT_ID"]
    assert settings.tenant_id == filled["DATAVERSE_TENANT_ID"]
    assert settings.client_secret.get_secret_value() == filled["DATAVERSE_CLIENT_SECRET"]
    for field in ("authority", "allow_insecure_http", "simulator_seed", "max_concurrency",
                  "max_response_mb", "response_deadline_seconds", "lock_wait_seconds",
                  "executor"):
        assert getattr(settings, field) == Settings.model_fields[field].default, field
    for field in ("db_path", "archive_dir", "entities_config_path"):
        shown = getattr(settings, field)
        assert Settings.model_fields[field].default == PROJECT_ROOT / shown, field
    assert staging_workers() == 0


def test_env_example_copied_unchanged_keeps_the_simulator(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if not k.startswith("DATAVERSE_")})
    assert load_settings().source == "simulator"


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file_and_heading(page):
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md"
                                   and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name} links to missing files or headings: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in DOCS.glob("*.md") if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_readme_starts_with_make_run_and_make_test():
    lines = README.read_text(encoding="utf-8").splitlines()
    first_fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    block = lines[first_fence + 1:first_fence + 3]
    assert first_fence < 10, "the first code block must come within the README's first lines"
    assert [line.split()[:2] for line in block] == [["make", "run"], ["make", "test"]], block
