"""CLI commands beyond ``validate`` and ``schema``: one module per feature, each with
``register(app: typer.Typer) -> None``."""
