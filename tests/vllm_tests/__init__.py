"""A package only so that mypy tells its conftest from tests/conftest.py (see [tool.mypy] in pyproject.toml)."""
