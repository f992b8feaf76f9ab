"""The project's sbatch templates on a real SLURM cluster brought up on this machine (root + apt-get).

One test, two jobs, both running 2-process DDP on CPU through ``srun`` with the tiny MAE:

* ``pretrain_single_node.sbatch`` (1 node x 2 tasks) must complete, the ranks training on disjoint
  subjects to identical weights and logging to the W&B run ``slurm-<job id>``;
* ``pretrain_multi_node.sbatch`` (2 nodes x 1 task) is sent SIGUSR1 while it waits after step 1:
  Lightning saves ``hpc_ckpt_1.ckpt`` in the run folder and requeues the job; the restarted job must
  resume at the saved global step, finish, and log to the same W&B run.

A second test on the same cluster: ``preprocess_array.sbatch`` as an array of 2 tasks fills one
cache, each task its own shard, every entry written once; ``fit``'s data set-up then preprocesses
nothing.

Skips (with the reason) only when the machine cannot host the cluster: not root, or SLURM missing
and no apt-get. Run with ``make test-slurm`` (also part of ``make test``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import FINISHED_STATES, LocalSlurmCluster, SlurmUnavailable, ensure_slurm_installed

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "experiments" / "slurm"
PAUSE_AT_STEP = 1
FINAL_STEP = 4  # tests/configs/ddp_common.yaml: 2 ranks x 2 steps per epoch x 2 epochs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as reason:
        pytest.skip(f"no local SLURM cluster possible here: {reason}")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm") / "cluster", nodes=("n1", "n2"), cpus_per_node=4) as c:
        yield c


def submit(cluster: LocalSlurmCluster, template: str, work: Path, tasks_per_node: int, *probe_args: str) -> str:
    """sbatch the template with CPU/tiny settings (through its variables and script arguments); the job id."""
    data = work.parent / "data"
    work.mkdir(parents=True)  # slurm cannot create the folder of --output
    script_args = [
        f"--trainer.logger.init_args.save_dir={work / 'runs'}",
        f"--data.init_args.phantom_root={data / 'phantoms'}",
        f"--data.init_args.cache_dir={data / 'cache'}",
        "--trainer.callbacks+=tests.ddp_probe.Probe",
        f"--trainer.callbacks.init_args.out_dir={work / 'probe'}",
        *probe_args,
    ]
    env = cluster.env({
        "CONFIG": "experiments/mae.yaml tests/configs/mae_tiny.yaml tests/configs/ddp_common.yaml",
        "TRAINER": "experiments/trainer/cpu.yaml",
        "EXTRA_ARGS": "--trainer.strategy ddp",
        "PYTHON": sys.executable,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    })
    # Command-line options override the template's #SBATCH lines: CPU tasks instead of GPUs here.
    return cluster.sbatch(TEMPLATES / template, f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--time=30", f"--output={work}/job-%j.out", script_args=tuple(script_args),
                          env=env, cwd=REPO)


def records(work: Path, attempt: int) -> list[dict]:
    return [json.loads((work / "probe" / f"rank{r}-attempt{attempt}.json").read_text()) for r in (0, 1)]


def offline_runs(runs: Path) -> list[Path]:
    """The offline W&B run folders (``offline-run-<time>-<id>``), oldest first."""
    return sorted(p for p in (runs / "wandb").glob("offline-run-*") if p.is_dir())


def wandb_records(run_folder: Path):
    """The protobuf records of an offline run's ``.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", f"not a W&B transaction log: {run_folder}"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room for a record header: padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged_run(run_folder: Path) -> tuple[str, list[int]]:
    """Run id and the ``trainer/global_step`` of every history row written to an offline run."""
    run_id, steps = None, []
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "trainer/global_step" in items:
                steps.append(int(json.loads(items["trainer/global_step"])))
    return run_id, steps


def describe(cluster: LocalSlurmCluster, job: str, work: Path) -> str:
    logs = "\n".join(p.read_text(errors="replace")[-6000:] for p in work.glob("job-*.out"))
    return f"job {job}: {cluster.job(job)}\n{logs}\n{cluster.logs(1500)}"


@pytest.mark.timeout(900)
def test_sbatch_templates_train_requeue_and_resume(cluster, tmp_path):
    started = time.monotonic()
    requeued_work, finished_work = tmp_path / "requeue", tmp_path / "single"

    requeued = submit(cluster, "pretrain_multi_node.sbatch", requeued_work, 1,
                      f"--trainer.callbacks.init_args.pause_at_step={PAUSE_AT_STEP}")
    single = submit(cluster, "pretrain_single_node.sbatch", finished_work, 2)

    # Multi-node job: wait until both ranks sit after step 1, then send the requeue signal.
    paused = [requeued_work / "probe" / f"paused-rank{r}" for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(p.exists() for p in paused):
        info = cluster.job(requeued)
        assert info["JobState"] not in FINISHED_STATES, describe(cluster, requeued, requeued_work)
        assert time.monotonic() < deadline, "the job never reached the pause\n" + describe(cluster, requeued, requeued_work)
        time.sleep(0.2)
    signalled = time.monotonic()
    cluster.run("scancel", "--signal=USR1", requeued)
    # slurm holds a requeued job before it may start again (BeginTime ~2 min ahead): release it now.
    cluster.wait(requeued, lambda info: int(info["Restarts"]) >= 1 and info["JobState"] == "PENDING", timeout=120)
    cluster.run("scontrol", "update", f"jobid={requeued}", "StartTime=now")
    requeue_delay = time.monotonic() - signalled

    single_info = cluster.wait_finished(single, timeout=400)
    assert single_info["JobState"] == "COMPLETED", describe(cluster, single, finished_work)
    info = cluster.wait_finished(requeued, timeout=400)
    assert info["JobState"] == "COMPLETED", describe(cluster, requeued, requeued_work)
    total = time.monotonic() - started
    print(f"SLURM test: requeue turnaround {requeue_delay:.1f} s, both jobs done in {total:.1f} s")

    # ---- the single-node job: 2 ranks on one node training MAE on disjoint subjects to identical
    # weights, one W&B run named after the job.
    ranks = records(finished_work, 0)
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2 and record.get("finished")
        assert record["slurm_job_id"] == single and record["run_id"] == f"slurm-{single}"
        assert record["global_step"] == FINAL_STEP
    for epoch in range(2):
        seen = [{c for b in record["batches"] if b["epoch"] == epoch for c in b["case_ids"]} for record in ranks]
        assert seen[0] and seen[1] and not seen[0] & seen[1], f"epoch {epoch}: subjects per rank {seen}"
    weights = [torch.load(finished_work / "probe" / f"rank{r}-attempt0.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the ranks ended with different weights"
    (single_run,) = offline_runs(finished_work / "runs")
    run_id, steps = logged_run(single_run)
    assert run_id == f"slurm-{single}" and steps and max(steps) == FINAL_STEP - 1

    # ---- the requeued multi-node job.
    run_id = f"slurm-{requeued}"
    run_dir = requeued_work / "runs" / "lightning-mim" / run_id
    first, second = records(requeued_work, 0), records(requeued_work, 1)
    for before, after in zip(first, second):
        assert before["run_id"] == after["run_id"] == run_id
        assert before["default_root_dir"] == after["default_root_dir"] == str(run_dir.resolve())
        assert before["global_step"] == PAUSE_AT_STEP and not before.get("finished")
        assert after["start_step"] == PAUSE_AT_STEP, f"the restarted job did not resume at step {PAUSE_AT_STEP}: {after}"
        assert after.get("finished") and after["global_step"] == FINAL_STEP
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == PAUSE_AT_STEP
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == FINAL_STEP
    # Both attempts logged to the same W&B run (one offline folder each; wandb sync uploads them in
    # order): the first up to the signal, the second from the restored step on.
    attempts = [logged_run(folder) for folder in offline_runs(requeued_work / "runs")]
    assert [logged for logged, _ in attempts] == [run_id, run_id], attempts
    (_, steps_before), (_, steps_after) = attempts
    assert steps_before and max(steps_before) < PAUSE_AT_STEP, f"the first attempt's W&B data was lost: {attempts}"
    assert steps_after and min(steps_after) >= PAUSE_AT_STEP and max(steps_after) == FINAL_STEP - 1, attempts
    log = "".join(p.read_text() for p in requeued_work.glob("job-*.out"))
    assert f"job {requeued} restart 0" in log and f"job {requeued} restart 1" in log


def array_tasks(cluster: LocalSlurmCluster, job: str) -> list[dict[str, str]]:
    """``scontrol show job`` of every task of an array job (one line each)."""
    done = cluster.run("scontrol", "show", "job", "-o", job)
    return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.timeout(600)
def test_preprocess_array_of_two_tasks_fills_one_cache(cluster, tmp_path, monkeypatch):
    from data_modules.phantoms import ensure_phantom_cohort
    from lightning_mim.reliability.check_data import data_module_from_args

    work, data = tmp_path / "array", tmp_path / "data"
    work.mkdir()
    ensure_phantom_cohort(data / "phantoms", 3, (64, 64, 32), seed=0)  # tests/configs/mae_tiny.yaml's cohort
    data_args = [f"--data.init_args.phantom_root={data / 'phantoms'}", f"--data.init_args.cache_dir={data / 'cache'}"]
    env = cluster.env({"CONFIG": "experiments/mae.yaml tests/configs/mae_tiny.yaml", "PYTHON": sys.executable,
                       "WORKERS": "1"})
    job = cluster.sbatch(TEMPLATES / "preprocess_array.sbatch", "--array=0-1", "--cpus-per-task=1", "--time=10",
                         f"--output={work}/task-%A_%a.out", script_args=tuple(data_args), env=env, cwd=REPO)

    deadline = time.monotonic() + 500
    while not (tasks := array_tasks(cluster, job)) or any(t.get("JobState") not in FINISHED_STATES for t in tasks):
        assert time.monotonic() < deadline, f"array {job} unfinished: {tasks}\n{cluster.logs(1500)}"
        time.sleep(0.5)
    logs = {path.name: path.read_text(errors="replace") for path in work.glob("task-*.out")}
    assert sorted(t.get("JobState") for t in tasks) == ["COMPLETED", "COMPLETED"], f"{tasks}\n{logs}"

    summaries = [re.search(r"shard (\d)/2: (\d+) case\(s\): (\d+) preprocessed, (\d+) already cached, 0 bad", text)
                 for text in logs.values()]
    assert all(summaries) and len(summaries) == 2, logs
    assert sorted(int(m.group(1)) for m in summaries) == [0, 1]  # each task took its own shard
    assert sum(int(m.group(2)) for m in summaries) == 3 and sum(int(m.group(3)) for m in summaries) == 3
    entries = [p for p in (data / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 3 and all(sorted(f.name for f in p.iterdir()) == ["image.npy", "meta.json"] for p in entries)

    def must_not_run(*args, **kwargs):
        raise AssertionError("fit preprocessed a case the array had cached")

    monkeypatch.setattr("data_modules.prepare.preprocess_case", must_not_run)
    monkeypatch.setattr("data_modules.prepare.inspect_case", must_not_run)
    module = data_module_from_args(["--config", str(REPO / "experiments/mae.yaml"),
                                    "--config", str(REPO / "tests/configs/mae_tiny.yaml"), *data_args])
    module.setup("fit")
    assert len(module.train_volumes) + len(module.val_volumes) == 3
