"""The ``cam-monitor`` command: the demo runs end to end and writes what the README promises."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cam_monitor as cm
from cam_monitor.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_engine import cpu_model  # noqa: E402  the CPU's name as the benchmarks record it


def test_demo_catches_the_shortcut_and_spares_the_control(tmp_path) -> None:
    """The README's main job at reduced size: the mask-free monitor alerts in the shortcut run and
    names the decoy's corner, nobody having marked it; the masked monitor (the ground truth) agrees;
    nothing fires in the control. Under the conditions the README states (:data:`README_DEMO_ENV`):
    with one thread the same seed trains another model, whose alert comes at epoch 2 (README)."""
    run = run_demo(tmp_path, "--epochs", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    shortcut, control = summary["shortcut"], summary["control"]
    assert {a["rule"] for a in shortcut["alerts"]} == {"shortcut_confirmed"}
    assert {a["rule"] for a in shortcut["masked_alerts"]} == {"spurious_enrichment"}
    assert shortcut["gap_passes_0.2_epoch"] is not None
    assert shortcut["first_alert_epoch"] <= shortcut["gap_passes_0.2_epoch"] + 2  # within two epochs of it
    corners = [(y0 < 8 or y1 > 24) and (x0 < 8 or x1 > 24)  # every named box touches a corner of the 32 px canvas
               for a in shortcut["alerts"] for r in a["regions"] if r["flips"] > r["control_flips"]
               for y0, x0, y1, x1 in r["boxes"]]
    assert corners and all(corners)
    assert control["alerts"] == [] and control["masked_alerts"] == [] and abs(control["accuracy_gap"]) < 0.1
    assert len(shortcut["epochs"]) == 3
    assert {"acc_matched", "acc_random", "cam/shortcut_evidence", "cam/masked/spurious_enrichment"} <= set(
        shortcut["epochs"][0])
    assert (tmp_path / "summary.png").stat().st_size > 20_000
    assert list((tmp_path / "shortcut").glob("events.out.tfevents.*"))
    assert (tmp_path / "shortcut" / "cam_monitor" / "alerts.jsonl").exists()
    printed = run.stdout
    assert "shortcut run" in printed and "control run" in printed and f"tensorboard --logdir {tmp_path}" in printed


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_demo_with_other_loggers(tmp_path, logger, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--per-class", "1", "--no-progress",
                 "--logger", logger, "--limit-train-batches", "4"]) == 0
    assert (tmp_path / "summary.json").exists()
    if logger == "csv":
        assert list((tmp_path / "shortcut" / "cam_monitor").glob("probe_grid_*.png"))
    else:
        assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_no_subcommand_prints_usage_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "cam-monitor demo" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--per-class", "0"], ["--logger", "mlflow"]])
def test_demo_rejects_bad_arguments(argv) -> None:
    with pytest.raises(SystemExit):
        main(["demo", *argv])


def test_lightning_cli_config_wires_the_callback(tmp_path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    with pytest.warns(UserWarning, match="CAMMonitor alert"):
        main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "8",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    alerts = list(tmp_path.rglob("cam_monitor/alerts.jsonl"))
    assert len(alerts) == 1 and "spurious_enrichment" in alerts[0].read_text()
    assert not list(tmp_path.rglob("*.ckpt"))  # the gate refused the shortcut model's checkpoint


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The cam-monitor command as a user runs it (its own process, its own command line)."""
    return subprocess.run([sys.executable, "-m", "cam_monitor.cli", *argv], capture_output=True, text=True, timeout=300)


def test_every_argument_of_the_monitor_and_the_gate_is_documented_for_the_cli() -> None:
    import inspect

    import docstring_parser

    for cls in (cm.CAMMonitor, cm.GatedModelCheckpoint):
        documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        wanted = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert [n for n in wanted if not documented.get(n)] == [], cls.__name__
    shown = cli("fit", "--trainer.callbacks.help", "cam_monitor.CAMMonitor")
    assert shown.returncode == 0 and "LightningCLI's args parameter" not in shown.stderr
    assert "explain the true class" in shown.stdout and "{label,pred}" in shown.stdout


def test_a_typo_in_a_choice_fails_at_parsing_naming_the_key(tmp_path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: cam_monitor.CAMMonitor\n      init_args:\n"
                      "        alerting:\n          action: warnn\nmodel:\n  class_path: cam_monitor.demo.model.DigitClassifier\n"
                      "data:\n  class_path: cam_monitor.demo.model.DecoyDigitsDataModule\n")
    run = cli("fit", "--config", str(config))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert 'Parser key "alerting.action"' in run.stderr and "Given value: warnn" in run.stderr


#: The conditions the README's demo block was printed under: training numerics differ between
#: PyTorch's CPU kernel levels (AVX2, AVX-512) and with the thread count, so the check pins them.
README_DEMO_ENV = {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_demo(out, *args: str) -> subprocess.CompletedProcess:
    """``cam-monitor demo`` writing to ``out``, in a fresh interpreter under :data:`README_DEMO_ENV`
    (skipped on a CPU without the AVX2 kernel level it pins)."""
    import os

    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the README's demo runs were printed at the AVX2 kernel level, which this CPU lacks")

    return subprocess.run([sys.executable, "-c", "import sys; from cam_monitor.cli import main; sys.exit(main(sys.argv[1:]))",
                           "demo", "--out", str(out), "--no-progress", *args],
                          env={**os.environ, **README_DEMO_ENV}, capture_output=True, text=True, timeout=1200)


#: The CPU family the README's demo block was printed on: training numerics depend on the CPU's
#: kernels (their blocking, hence the order of sums) beyond the kernel level the env pins, so on
#: another family the same command trains another model (the README says how it differed).
README_DEMO_CPU = "AMD EPYC"


def readme_demo_block() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert " ".join(f"{k}={v}" for k, v in README_DEMO_ENV.items()) + " make demo" in readme  # the stated conditions
    assert f"on a 2-core {README_DEMO_CPU} VM" in readme
    return re.search(r"<!-- demo-output:.*?-->\n```\n(.*?)\n```\n<!-- /demo-output -->", readme, re.S).group(1)


@pytest.fixture(scope="module")
def printed_demo(tmp_path_factory) -> str:
    """What `make demo` (seed 0, 6 epochs) prints under :data:`README_DEMO_ENV`, from the shortcut
    table to the first alert's sentence: run once for the tests below."""
    run = run_demo(tmp_path_factory.mktemp("demo"))
    assert run.returncode == 0, run.stderr[-2000:]
    start = run.stdout.index("shortcut run\n")
    return run.stdout[start:run.stdout.index("\n", run.stdout.index("the shortcut run's first alert:"))]


def form(block: str) -> list[str]:
    """A printed block with every number, the alert-regions column and the alert's probes and
    regions cut away: what stays the same on any CPU."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", "#", line.split(" probes:")[0])
        if re.match(r"\s*# ", line):  # a table row: the last column names whichever epoch alerted
            head, tail = line.rsplit("|", 1)
            line = f"{head}| {' '.join(tail.split()[:2])}"
        out.append(" ".join(line.split()))
    return out


@pytest.mark.slow
def test_the_readme_block_has_the_form_the_demo_prints(printed_demo) -> None:
    """On any CPU: the README's block has the demo's columns, rows and sentences, line for line."""
    assert form(printed_demo) == form(readme_demo_block())


@pytest.mark.slow
def test_the_readme_shows_what_the_demo_prints(printed_demo) -> None:
    """On the CPU family the README names, under the conditions it states: the README's demo block
    is the output of `make demo`, digit for digit."""
    if README_DEMO_CPU not in " ".join(re.sub(r"\((R|TM)\)", " ", cpu_model()).split()):  # 'Intel(R) Xeon(R) ...' reads 'Intel Xeon ...'
        pytest.skip(f"the README's demo block was printed on {README_DEMO_CPU}, this CPU is {cpu_model()!r}, whose "
                    "kernels sum in another order (the form is checked on every CPU)")
    assert printed_demo == readme_demo_block()


def test_the_cli_choice_of_methods_is_the_engines_list() -> None:
    import typing

    from cam_monitor.settings import Method
    from cam_monitor.methods import METHODS

    assert set(typing.get_args(Method)) == set(METHODS)
