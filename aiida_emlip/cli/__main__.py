"""Allow ``python -m aiida_emlip.cli``."""

from aiida_emlip.cli.main import cli

if __name__ == "__main__":
    cli(prog_name="aiida-emlip")
