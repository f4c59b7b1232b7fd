"""The ``vapipe`` command groups; ``cli.py`` assembles them into one typer app.

Each command parses its options, loads the settings and calls one library function.
"""
