"""Many nodes, as a user runs them: two hosts (network namespaces joined by a veth pair, see multihost.py),
each running DeepSpeed's launcher with --no_ssh, one CPU rank per host. The two hosts train the same
student as one host with two ranks; a host killed mid-run ends the other within seconds with a line
naming the lost peer, and --resume on both ends where the uninterrupted run ended; a frozen host ends the
others after --dist-timeout; a teacher cache or --output-dir on node-local disks is refused on every host.

The hosts share this machine's filesystem except for `local/`, which each host sees as its own directory
(a bind mount in that host's mount namespace), like a node-local disk.
"""

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoTokenizer

import multihost
from pkd_fast.config import default_teacher
from pkd_fast.models import fresh_mlm_head
from pkd_fast.train import main
from test_config import assert_one_line_error
from test_train import GLUE_DIR, REPO, SMALL, ds_json, save_teacher, train, train_log

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}"),
]

STEPS, SAVE_EVERY = 6, 2  # 96 rows, 8 per rank and step, two ranks
KILL_EXIT_S = 30  # a killed peer's sockets close at once: the survivor needs seconds, not a timeout
DIST_TIMEOUT_S = 20
TIMEOUT_SLACK_S = 30  # the survivor's step in flight, its error path and the launcher's exit, on 2 busy cores


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_dist_timeout_is_a_positive_number_of_seconds(capsys, tmp_path, value):
    assert_one_line_error(capsys, ["--dist-timeout", value, "--output-dir", str(tmp_path)],
                          "--dist-timeout must be a positive number of seconds")


def open_hosts(workdir: Path) -> multihost.TwoHosts:
    """Two hosts with node-local disks at workdir/local; a machine that cannot make them fails the test."""
    (workdir / "local").mkdir(parents=True, exist_ok=True)
    disks = (workdir / "disk-host1", workdir / "disk-host2")
    for disk in disks:
        disk.mkdir(exist_ok=True)
    try:
        return multihost.TwoHosts(workdir, local_path=workdir / "local", disks=disks).open()
    except multihost.HarnessError as err:
        pytest.fail(f"the multi-node tests need two network namespaces and could not make them: {err}")


@pytest.fixture
def hosts(tmp_path):
    two = open_hosts(tmp_path)
    try:
        yield two
    finally:
        two.close()


def error_lines(launch: multihost.Launch) -> list[str]:
    return [line for line in launch.output().splitlines() if line.startswith("error:")]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The PKD-Skip student trained on two hosts, checkpointing every 2 steps, never interrupted: what the
    one-host run and every interrupted two-host run must come back to. Dropout is on, so equality needs
    each rank's RNG restored on resume."""
    tmp = tmp_path_factory.mktemp("multinode")
    teacher = save_teacher(tmp / "teacher", "sst2")
    common = ["--deepspeed", ds_json(tmp, train_micro_batch_size_per_gpu=8), "--stage", "student", "--teacher", teacher,
              "--strategy", "skip", "--max-train-samples", str(STEPS * 16), "--epochs", "1",
              "--save-steps", str(SAVE_EVERY), "--temperature", "1", *SMALL]
    two = open_hosts(tmp / "hosts")
    try:
        launches = two.run_both([*common, "--output-dir", str(tmp / "two-hosts")], log_name="whole")
    finally:
        two.close()
    assert all(l.proc.returncode == 0 for l in launches), multihost.describe(launches)
    return common, tmp / "two-hosts" / "students" / "skip"


def test_two_hosts_train_the_student_one_host_with_two_ranks_trains(tmp_path, whole):
    """Same ranks, micro-batches and seeds; the transport differs (a veth link between two network stacks
    instead of loopback) and so do the threads per rank (each host's rank has both cores, each of one
    host's two ranks one core), so matmuls sum in another order. The logged losses agree within
    test_train's 2-rank tolerances, at T=1 as there (at T=10 the T²-scaled KD term of a fresh student is a
    difference of O(1) parts that fp32 rounding alone moves ~1%), and the dev metric is the same. The
    finished run keeps results, model and no checkpoints."""
    common, two_hosts = whole
    train([*common, "--output-dir", str(tmp_path / "one-host")], ranks=2)
    one_host = tmp_path / "one-host" / "students" / "skip"
    log1, log2 = train_log(one_host), train_log(two_hosts)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, STEPS + 1))
    for a, b in zip(log1, log2):
        for term in ("total", "ce", "kd", "pt"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=5e-8), (a["step"], term)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one_host, two_hosts))
    assert r2["dev"] == r1["dev"]
    assert not (two_hosts / "checkpoints").exists()


def zero3_json(tmp: Path) -> str:
    """The shipped ZeRO-3 JSON in fp32 with the small micro-batch of these runs."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 8})
    (tmp / "z3.json").write_text(json.dumps(config))
    return str(tmp / "z3.json")


def mlm_teacher_and_text(tmp: Path) -> tuple[str, str]:
    """A masked-LM teacher (the offline MiniLM with a fresh tied head: what --stage teacher starts from) and
    200 SST-2 sentences as raw text."""
    fresh_mlm_head(default_teacher()).save_pretrained(tmp / "mlm_teacher")
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(tmp / "mlm_teacher")
    with open(GLUE_DIR / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:201]
    (tmp / "text.txt").write_text("".join(row[0] + "\n" for row in rows))
    return str(tmp / "mlm_teacher"), str(tmp / "text.txt")


@pytest.mark.parametrize("case", ["zero3", "mlm"])
def test_two_hosts_train_what_one_host_with_two_ranks_trains_on_zero3_and_mlm(hosts, tmp_path, whole, case):
    """The same equality for ZeRO-3 (the student partitioned across the hosts, the teacher in its own ZeRO-3
    engine) and for the masked-LM objective (a PKD student of a masked-LM teacher on raw text)."""
    common, _ = whole
    if case == "zero3":
        args = [*common[common.index("--stage"):], "--deepspeed", zero3_json(tmp_path)]
        run_dir = Path("students") / "skip"
    else:
        teacher, text = mlm_teacher_and_text(tmp_path)
        args = ["--objective", "mlm", "--stage", "student", "--teacher", teacher, "--text-files", text,
                "--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=4), "--max-seq-length", "32",
                "--max-steps", "4", "--log-steps", "1", "--temperature", "1", "--loss-impl", "eager"]
        run_dir = Path("students") / "alternate"
    two = hosts.run_both([*args, "--output-dir", str(tmp_path / "two")], log_name=case)
    assert all(l.proc.returncode == 0 for l in two), multihost.describe(two)
    train([*args, "--output-dir", str(tmp_path / "one")], ranks=2)
    log1, log2 = train_log(tmp_path / "one" / run_dir), train_log(tmp_path / "two" / run_dir)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] and len(log1) >= 4
    for a, b in zip(log1, log2):
        for term in ("total", "ce", "kd", "pt"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=5e-8), (case, a["step"], term)
    r1, r2 = (json.loads((tmp_path / d / run_dir / "results.json").read_text()) for d in ("one", "two"))
    assert r2["dev"] == pytest.approx(r1["dev"], rel=1e-4)


def test_a_killed_host_stops_the_other_naming_it_and_resume_on_both_ends_where_the_whole_run_ended(hosts, tmp_path, whole):
    """SIGKILL every process of host 2 once the step-2 checkpoint is published: host 1 exits within seconds
    with one error line naming host 2's address; relaunching both with --resume continues from step 2 and
    ends with the uninterrupted run's losses, dev metric and weights."""
    common, two_hosts = whole
    out = tmp_path / "out"
    run = [*common, "--output-dir", str(out)]
    host1, host2 = hosts.start_both(run, log_name="killed")
    latest = out / "students" / "skip" / "checkpoints" / "latest"
    multihost.wait_for(latest.is_file, 240, "the first checkpoint", (host1, host2))
    host2.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        host1.wait(KILL_EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host 1 still running {KILL_EXIT_S} s after host 2 was killed\n" + multihost.describe((host1, host2)))
    print(f"host 1 exited {time.monotonic() - killed_at:.1f} s after host 2 was killed")
    assert host1.proc.returncode != 0
    [line] = error_lines(host1)
    assert line.startswith(f"error: rank 0: lost the connection to the peer at {hosts.hosts[1].addr}"), line
    assert latest.read_text() == f"step{SAVE_EVERY}"

    resumed = hosts.run_both([*run, "--resume"], log_name="resumed")
    assert all(l.proc.returncode == 0 for l in resumed), multihost.describe(resumed)
    assert f"resumed at step {SAVE_EVERY}" in resumed[0].output()
    run_dir = out / "students" / "skip"
    whole_log, log = train_log(two_hosts), train_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for a, b in zip(whole_log, log):
        assert b["total"] == pytest.approx(a["total"], rel=1e-6), a["step"]
    r_whole, r = (json.loads((d / "results.json").read_text()) for d in (two_hosts, run_dir))
    assert r["dev"] == r_whole["dev"]
    w_whole, w = weights(two_hosts), weights(run_dir)
    assert w.keys() == w_whole.keys()
    for name in w:
        np.testing.assert_allclose(w[name], w_whole[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_frozen_host_stops_the_other_after_dist_timeout(hosts, tmp_path, whole):
    """SIGSTOP host 2's processes: their sockets stay open, so nothing tells host 1 the peer is gone but
    silence. Host 1 gives up after --dist-timeout (here 20 s, not the backends' 10-30 minutes), naming the
    timeout in one error line."""
    common, _ = whole
    out = tmp_path / "out"
    host1, host2 = hosts.start_both([*common, "--output-dir", str(out), "--dist-timeout", str(DIST_TIMEOUT_S)],
                                    log_name="frozen")
    multihost.wait_for((out / "students" / "skip" / "checkpoints" / "latest").is_file, 240, "the first checkpoint",
                       (host1, host2))
    host2.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        host1.wait(DIST_TIMEOUT_S + TIMEOUT_SLACK_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host 1 still waiting {DIST_TIMEOUT_S + TIMEOUT_SLACK_S} s after host 2 froze "
                    f"(--dist-timeout {DIST_TIMEOUT_S})\n" + multihost.describe((host1, host2)))
    waited = time.monotonic() - frozen_at
    print(f"host 1 exited {waited:.1f} s after host 2 froze (--dist-timeout {DIST_TIMEOUT_S})")
    assert host1.proc.returncode != 0
    [line] = error_lines(host1)
    assert line.startswith(f"error: rank 0: a peer sent nothing for --dist-timeout {DIST_TIMEOUT_S} s"), line
    assert waited >= DIST_TIMEOUT_S - 5  # it was the timeout, not something else, that ended the wait


def test_node_local_output_dir_and_teacher_cache_are_refused_on_every_host(hosts, tmp_path, whole):
    """local/ is another directory on each host. --output-dir there: host 2 would write its checkpoint parts
    where rank 0 never publishes them, and resume from nothing. --teacher-cache there: host 2 would write
    its rows into files rank 0 never reads. Both are refused before any training, one line on each host."""
    common, _ = whole
    local = hosts.local_path
    refused = hosts.run_both([*common, "--output-dir", str(local / "out")], log_name="local-out")
    for launch in refused:
        assert launch.proc.returncode != 0
        [line] = error_lines(launch)
        assert line.startswith(f"error: --output-dir {local / 'out'}: not on a filesystem shared by all ranks (rank 1 on "), line
    cache_args = [*common, "--stage", "cache", "--output-dir", str(tmp_path / "out")]
    refused = hosts.run_both([*cache_args, "--teacher-cache", str(local / "cache")], log_name="local-cache")
    for launch in refused:
        assert launch.proc.returncode != 0
        [line] = error_lines(launch)
        assert line.startswith(f"error: --teacher-cache {local / 'cache'}: not on a filesystem shared by all ranks "
                               "(rank 1 on "), line
    assert [p for i in (1, 2) for p in (tmp_path / f"disk-host{i}").glob("cache*")] == []  # nothing left behind


def test_a_cache_written_by_two_hosts_equals_the_one_host_cache(hosts, tmp_path, whole):
    """On a directory both hosts share, each host writes its ranks' rows into rank 0's files: the store
    has the one-rank store's fingerprint and layout, and the same outputs to fp32 rounding (the hosts run
    the teacher on other batches, so other padding widths)."""
    common, _ = whole
    cache_args = [*common, "--stage", "cache"]
    two = hosts.run_both([*cache_args, "--teacher-cache", str(tmp_path / "cache-two"), "--output-dir", str(tmp_path / "o2")],
                         log_name="cache")
    assert all(l.proc.returncode == 0 for l in two), multihost.describe(two)
    main([*cache_args, "--teacher-cache", str(tmp_path / "cache-one"), "--output-dir", str(tmp_path / "o1")])  # 1 rank
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("cache-one", "cache-two"))
    assert two["fingerprint"] == one["fingerprint"] and two["layout"] == one["layout"]
    for name in ("logits", "hidden"):
        a, b = (np.load(tmp_path / d / f"{name}.npy") for d in ("cache-one", "cache-two"))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
