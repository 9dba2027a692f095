"""`retention fit` on 2 "nodes" x 1 process on localhost (two torchrun launchers, gloo) gives the 1-rank run's
numbers, and only global rank 0 prepares the run folder, whichever launcher set the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from tiny_runs import RATES, read_run, write_config

from retention.runfolder import launched_as_rank_zero


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),   # torchrun, node 0
    ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun, node 1
    ({"SLURM_PROCID": "3"}, False),                                # srun
    ({"NODE_RANK": "1"}, False),   # Lightning's launcher on node 1: its first process has no other rank variable
    ({"LOCAL_RANK": "1"}, False),  # a process Lightning's launcher started
])
def test_only_global_rank_zero_prepares_the_run_folder(env, zero):
    assert launched_as_rank_zero(env) is zero


def test_two_nodes_match_one_rank(one_rank):
    config, folder = one_rank
    nodes = write_config(config.parent, "nodes")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launcher(node_rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "retention", "fit", "--config", str(nodes), "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.strategy", "ddp"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    launchers = [launcher(0), launcher(1)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for p, out in zip(launchers, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # the second launcher's process is global rank 1
    one, one_probes = read_run(folder)
    two, two_probes = read_run(config.parent / "runs" / "nodes")
    assert two["environment"]["world_size"] == 2
    for key in RATES:
        assert two[key] == one[key], key
    assert two_probes.keys() == one_probes.keys()
    assert not (config.parent / "runs" / "nodes" / "incomplete.json").exists()
