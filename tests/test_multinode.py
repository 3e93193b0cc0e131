"""Several nodes, simulated on one machine (issue 27): two torchrun agents on 127.0.0.1 (`--nnodes 2
--nproc-per-node 1`, c10d rendezvous), each with its own HOME standing in for a node's local disk, must train
exactly what one agent with two ranks trains. What this cannot test: a real network, NCCL between machines."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo
import palmr

ROOT = Path(__file__).resolve().parent.parent
# the default job (tiny checkpoint, shapes, a short warm start: every cache of a node), shortened
JOB = ["--max-steps", "2", "--warmup-steps", "8", "--rollout-batch", "4", "--update-batch", "2", "--group-size", "2",
       "--max-new-tokens", "12", "--save-every", "2", "--log-rollouts-every", "0"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(home, out, launcher):
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PALMR_SHARED_CACHE", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "grpo.py"),
                             "--out", str(out), *JOB], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, what):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_two_agents_on_two_nodes_train_what_one_agent_with_two_ranks_trains(tmp_path):
    single = _agent(tmp_path / "home-single", tmp_path / "single", ["--nnodes", "1", "--nproc-per-node", "2"])
    _finish(single, "one agent, 2 ranks")
    port = _free_port()
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "palmr-two-nodes"]
    agents = [_agent(tmp_path / f"home-node{n}", tmp_path / "multi", rdzv) for n in range(2)]
    logs = [_finish(a, f"agent {n} of 2") for n, a in enumerate(agents)]
    # every node built its own caches on its own disk (HOME), none reached into another's
    for n in range(2):
        cache = tmp_path / f"home-node{n}" / ".cache" / "palmr"
        assert (cache / "tiny-qwen25vl" / "config.json").exists() and (cache / "shapes-v2" / "train.jsonl").exists()
        assert (cache / "tiny-qwen25vl-warm8-h0.3-s0-v2" / "config.json").exists(), f"node {n}: no warm start"
    # the same parameters after 2 steps, and the same metrics (all but wall times)
    a = load_file(tmp_path / "single" / "checkpoint-000002" / "model.safetensors")
    b = load_file(tmp_path / "multi" / "checkpoint-000002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "two nodes trained other weights"
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("single", "multi")]
    assert [r["step"] for r in rows[1]] == [1, 2], "one metrics row per step: global rank 0 logs alone"
    for x, y in zip(*rows):
        assert {k: v for k, v in x.items() if not k.startswith("t_")} == \
            {k: v for k, v in y.items() if not k.startswith("t_")}, f"step {x['step']} differs"
    assert sum("step 2/2" in log for log in logs) == 1, "the step line comes from global rank 0 only"


def test_caches_are_built_once_per_node_unless_the_user_says_they_are_shared(monkeypatch):
    monkeypatch.delenv("PALMR_SHARED_CACHE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert palmr.builds_cache(), "local rank 0 of every node builds its node's cache"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not palmr.builds_cache()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("PALMR_SHARED_CACHE", "1")
    monkeypatch.setattr(palmr, "get_rank", lambda: 1)  # local rank 0 of the second node
    assert not palmr.builds_cache(), "a shared cache: global rank 0 alone builds it"
    monkeypatch.setattr(palmr, "get_rank", lambda: 0)
    assert palmr.builds_cache()


def test_a_tensor_parallel_group_never_crosses_a_node(monkeypatch, capsys, tiny_ckpt, shapes_file, tmp_path):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per node, as in the two-agent test
    with pytest.raises(SystemExit) as e:
        grpo.main(["--model", tiny_ckpt, "--data", shapes_file, "--out", str(tmp_path / "o"), "--vllm-tp", "2"])
    assert e.value.code == 2 and "--vllm-tp 2: a node's ranks must hold whole groups" in capsys.readouterr().err
