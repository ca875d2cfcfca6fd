"""The ``cam-monitor`` command.

``cam-monitor demo [...]`` runs the built-in demo; ``cam-monitor fit|validate|test|predict
--config FILE`` is Lightning's own LightningCLI (jsonargparse), so any model, data module and
callbacks, ``cam_monitor.CAMMonitor`` included, are wired from YAML.
"""
from __future__ import annotations

import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None) -> None:
    """Run LightningCLI in subclass mode: model and data classes come from the config. ``argv`` None
    lets it read the command line itself (passing it as well makes Lightning warn of a mistake)."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(None if from_command_line else argv)
        return 0
    if argv and argv[0] == "demo":
        from .demo.run import main as demo_main

        return demo_main(argv[1:])
    wants_help = bool(argv) and argv[0] in ("-h", "--help")
    print(__doc__.strip(), file=sys.stdout if wants_help else sys.stderr)
    return 0 if wants_help else 2


if __name__ == "__main__":
    raise SystemExit(main())
