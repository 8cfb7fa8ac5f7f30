"""Config: the seed YAML is the embedded default; bad values are one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_dist.config import TrainConfig, load_config, parse_phases
from mnist_dist.errors import UserError

from conftest import ROOT, run_cli


def test_seed_yaml_equals_embedded_defaults():
    from_file = load_config(ROOT / "configs/seed.yaml")
    assert from_file == TrainConfig()
    assert [(p.epochs, p.lr) for p in from_file.phases] == [(5, 0.5), (5, 0.1)]
    assert (from_file.batch_size, from_file.val_batch_size, from_file.data.val_size) == (128, 256, 10_000)


def test_overrides_and_set_apply_in_order():
    cfg = load_config(
        ROOT / "configs/seed.yaml",
        {"batch_size": 64, "phases": parse_phases("2x0.3,1x0.01"), "data.dir": "/x"},
        ["phases.1.lr=0.02", "wandb.mode=offline"],
    )
    assert cfg.batch_size == 64
    assert [(p.epochs, p.lr) for p in cfg.phases] == [(2, 0.3), (1, 0.02)]
    assert cfg.data.dir == "/x" and cfg.wandb.mode == "offline"


def test_any_list_of_phases_works():
    cfg = load_config(None, {"phases": parse_phases("1x0.5,2x0.2,3x0.05")})
    assert cfg.total_epochs == 6


def test_config_round_trips_through_yaml(tmp_path: Path):
    cfg = load_config(None, {"seed": 7, "precision": "bf16"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_strings_that_read_as_numbers_round_trip(tmp_path: Path):
    """A sweep member id is 10 hex digits: 61770e5363 is a float to YAML 1.2 (read as inf), and `no`
    a boolean to YAML 1.1; config.yaml quotes both, so the member's config reads back as written."""
    import yaml

    sweep = {"name": "lr", "member": "61770e5363", "params": {"seed": 1}}
    base = load_config(None, {"precision": "no"})
    cfg = type(base).model_validate({**base.model_dump(), "sweep": sweep})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    plain = yaml.safe_load(path.read_text())
    assert plain["sweep"]["member"] == "61770e5363" and plain["precision"] == "no"


def test_on_off_yes_no_stay_words(tmp_path: Path):
    """YAML 1.1 (PyYAML's default) reads off/no/on as booleans; the schema's choices are those words."""
    path = tmp_path / "c.yaml"
    path.write_text("cuda_graphs: off\nprecision: no\nprogress: on\n")
    cfg = load_config(path, sets=["progress=off"])
    assert (cfg.cuda_graphs, cfg.precision, cfg.progress) == ("off", "no", "off")
    assert load_config(sets=["cuda_graphs=off"]).cuda_graphs == "off"
    with pytest.raises(UserError, match="'tracker' = True: input should be 'wandb', 'tensorboard' or 'none'"):
        load_config(sets=["tracker=true"])


def test_fingerprint_ignores_where_but_not_what():
    base = TrainConfig()
    assert base.fingerprint() == TrainConfig(output_dir="/elsewhere", tracker="none").fingerprint()
    assert base.fingerprint() != TrainConfig(seed=1).fingerprint()
    # How often to save and how often to requeue do not change a number: a job stopped with
    # max_requeues 0 resumes under the default (test_slurm's 2-node -> 1-node resume).
    assert base.fingerprint() == TrainConfig(max_requeues=0, checkpoint={"keep": 5}).fingerprint()


BAD_CLI = [
    (["--set", "phases.0.lr=-1"], "'phases[0].lr' = -1: must be a finite number > 0"),
    (["--set", "phases.0.lr=0"], "'phases[0].lr' = 0: must be a finite number > 0"),
    (["--set", "phases.1.lr=.nan"], "'phases[1].lr' = nan: must be a finite number > 0"),
    (["--set", "phases.1.lr=.inf"], "'phases[1].lr' = inf"),
    (["--set", "phases.0.epochs=0"], "'phases[0].epochs' = 0: input should be greater than or equal to 1"),
    (["--batch-size", "0"], "'batch_size' = 0"),
    (["--val-size", "60000"], "'data.val_size' = 60000: input should be less than 60000"),
    (["--precision", "fp8"], "'precision' = 'fp8': input should be 'no', 'bf16' or 'fp16'"),
    (["--tracker", "mlflow"], "'tracker' = 'mlflow'"),
    (["--device", "tpu"], "'device' = 'tpu'"),
    (["--source", "ftp"], "'data.source' = 'ftp'"),
    (["--set", "bogus=1"], "unknown key 'bogus'; allowed keys here: name, seed, phases"),
    (["--set", "data.foo=1"], "unknown key 'data.foo'; allowed keys here: source, dir, val_size, split_seed"),
    (["--set", "seed='7'"], "'seed' = '7': input should be a valid integer"),
    (["--phases", "5x"], "--phases: '5x' is not EPOCHSxLR"),
    (["--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
    (["--set", "batch_size=50001"], "is larger than the 50000 training images"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_bad_cli_values_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path):
    proc = run_cli("train", "--output-dir", tmp_path / "run", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("phases: [{epochs: 5, lr: 0.5}\nseed: 1\n", "malformed YAML at line"),
        ("- 1\n- 2\n", "expected a mapping of keys at the top level"),
        (
            "phases:\n  - {epochs: 5, lr: 0.5, momentum: 0.9}\n",
            "unknown key 'phases[0].momentum'; allowed keys here: epochs, lr",
        ),
        ("batch_size: 12.5\n", "'batch_size' = 12.5: input should be a valid integer"),
        ("phases: []\n", "'phases' = []: list should have at least 1 item"),
    ],
)
def test_bad_config_files_exit_2_with_one_line(text: str, message: str, tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_cli("train", "--config", path, "--output-dir", tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert path.read_text() == text


def test_load_config_raises_user_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("precision: fp4\n")
    with pytest.raises(UserError, match=rf"{path}: 'precision' = 'fp4'"):
        load_config(path)


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom mnist_dist.cli import main\n"
        "for args in (['--help'], ['train', '--help'], ['data', 'prepare', '--help']):\n"
        "    assert main(args) == 0\n"
        "heavy = sorted(m for m in ('torch', 'wandb', 'matplotlib', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_seed_yaml_lists_the_tutorial_phases():
    raw = yaml.safe_load((ROOT / "configs/seed.yaml").read_text())
    assert raw["phases"] == [{"epochs": 5, "lr": 0.5}, {"epochs": 5, "lr": 0.1}]
