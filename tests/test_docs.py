"""Documentation that is generated must stay current."""

from pathlib import Path

from storage.tables import schema_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_schema_doc_matches_the_tables():
    text = (ROOT / "docs" / "schemas.md").read_text()
    assert schema_markdown().rstrip() in text, "regenerate docs/schemas.md (command at its top)"


def test_readme_names_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in ci and "python -m pytest -q" in readme
