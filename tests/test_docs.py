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
    commands = readme.split("## The two commands", 1)[1].split("```", 2)[1]  # the README's first code block there
    assert "make sweep" in commands and "make test" in commands
    assert "\nmake test\n" in ci  # .ci/run runs the README's test command
    makefile = (ROOT / "Makefile").read_text()
    assert "python -m pytest -q" in makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "fitprune sweep" in makefile.split("\nsweep:", 1)[1].split("\n\n", 1)[0]
