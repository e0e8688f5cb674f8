"""Tests of the small utilities: dnnlib (EasyDict, parse_int_list), torch_utils.rng, torch_utils.distributed.

The distributed helpers are checked both without a process group (world size 1) and in a real
2-process gloo group on 127.0.0.1, started the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dnnlib
from dnnlib import util
from torch_utils import distributed, rng

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# dnnlib.EasyDict


def test_easydict_attributes_are_items():
    d = dnnlib.EasyDict(lr=1e-3, batch=512)
    assert d.lr == 1e-3 and d["batch"] == 512
    d.dropout = 0.13
    assert d["dropout"] == 0.13
    d["augment"] = 0.12
    assert d.augment == 0.12
    del d.lr
    assert "lr" not in d
    assert isinstance(d, dict) and dict(d) == {"batch": 512, "dropout": 0.13, "augment": 0.12}


def test_easydict_missing_attribute():
    """A missing key is an AttributeError (so getattr defaults and hasattr work), not a KeyError."""
    d = dnnlib.EasyDict(a=1)
    with pytest.raises(AttributeError, match="missing"):
        d.missing
    with pytest.raises(AttributeError, match="missing"):
        del d.missing
    assert getattr(d, "missing", 7) == 7
    assert not hasattr(d, "missing") and hasattr(d, "a")


# ----------------------------------------------------------------------------------------------
# dnnlib.parse_int_list


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0-3,7", [0, 1, 2, 3, 7]),
        ("5", [5]),
        ("0-0", [0]),
        ("0-3,7,10-11", [0, 1, 2, 3, 7, 10, 11]),
        (" 1 , 2-3 ", [1, 2, 3]),
        ("49999-50001", [49999, 50000, 50001]),
        ([3, 1, 2], [3, 1, 2]),
    ],
)
def test_parse_int_list(text, expected):
    assert dnnlib.parse_int_list(text) == expected


@pytest.mark.parametrize("text", ["3-1", "a", "", "1,,2", "-1", "1.5", "1-", "0-3,x"])
def test_parse_int_list_rejects(text):
    with pytest.raises(ValueError):
        dnnlib.parse_int_list(text)


def test_parse_int_list_reversed_range_message():
    """The message tells how to write the range."""
    with pytest.raises(ValueError, match="1-3"):
        dnnlib.parse_int_list("3-1")


# ----------------------------------------------------------------------------------------------
# torch_utils.rng


@pytest.mark.parametrize("fn, torch_fn", [(rng.randn, torch.randn), (rng.rand, torch.rand)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_generators_equal_per_sample_draws(fn, torch_fn, dtype):
    """Row i of a draw from a list of generators is what generator i alone draws for one sample."""
    seeds = [3, 1, 4, 1, 5]
    draw = fn([5, 2, 3], rng.seeded_generators(seeds), dtype=dtype)
    assert draw.shape == (5, 2, 3) and draw.dtype == dtype
    for i, seed in enumerate(seeds):
        assert torch.equal(draw[i], torch_fn([2, 3], generator=torch.Generator().manual_seed(seed), dtype=dtype))
    assert torch.equal(draw[1], draw[3])  # same seed, same sample


def test_single_generator_equals_torch():
    g = torch.Generator().manual_seed(9)
    assert torch.equal(rng.randn([4, 3], g), torch.randn([4, 3], generator=torch.Generator().manual_seed(9)))


def test_none_generator_uses_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(123)
        a = rng.randn([3, 2])
        torch.manual_seed(123)
        assert torch.equal(a, torch.randn([3, 2]))


@pytest.mark.parametrize("count, shape", [(2, [3, 4]), (4, [3, 4]), (1, [])])
def test_wrong_generator_count_raises(count, shape):
    with pytest.raises(ValueError, match="generator"):
        rng.randn(shape, rng.seeded_generators(range(count)))


def test_randn_like_fn():
    """randn_like_fn(generator)(x) draws like x (shape, dtype, device) from the given generators."""
    x = torch.zeros(3, 2, 2, dtype=torch.float64)
    got = rng.randn_like_fn(rng.seeded_generators([7, 8, 9]))(x)
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
    assert torch.equal(got, rng.randn(x.shape, rng.seeded_generators([7, 8, 9]), dtype=torch.float64))
    # Consecutive calls advance the generators (churn noise differs from step to step).
    fn = rng.randn_like_fn(torch.Generator().manual_seed(0))
    assert not torch.equal(fn(x), fn(x))


def test_device_of():
    assert rng.device_of(None) == torch.device("cpu")
    assert rng.device_of(torch.Generator()) == torch.device("cpu")
    assert rng.device_of(rng.seeded_generators([1, 2])) == torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# torch_utils.distributed without a process group


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_distributed_single_process(no_torchrun_env, capsys):
    """World size 1 without initialisation: every helper works and is trivial."""
    assert not distributed.launched_by_torchrun()
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert distributed.init() == expected
    assert not distributed.is_initialized()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.get_local_rank() == 0 and distributed.is_main()
    distributed.barrier()
    t = torch.tensor([1.0, 2.0])
    out = distributed.all_reduce_sum(t)
    assert out is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    distributed.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    distributed.shutdown()


def test_launched_by_torchrun_needs_all_vars(no_torchrun_env, monkeypatch):
    for name, value in [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]:
        monkeypatch.setenv(name, value)
    assert not distributed.launched_by_torchrun()
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.launched_by_torchrun()


# ----------------------------------------------------------------------------------------------
# torch_utils.distributed with 2 gloo ranks

_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from torch_utils import distributed
    device = distributed.init(timeout_s=60)
    t = torch.tensor([distributed.get_rank() + 1.0])
    out = distributed.all_reduce_sum(t)
    distributed.print0("PRINT0-MARKER")
    distributed.barrier()
    result = dict(rank=distributed.get_rank(), world=distributed.get_world_size(),
                  local=distributed.get_local_rank(), main=distributed.is_main(),
                  initialized=distributed.is_initialized(), device=str(device),
                  sum=t.tolist(), in_place=out is t)
    distributed.shutdown()
    result["after_shutdown"] = distributed.is_initialized()
    print("RESULT " + json.dumps(result))
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_gloo_ranks():
    """2 ranks on 127.0.0.1: world size 2, distinct ranks, all-reduce sums 1 + 2 = 3, print0 on rank 0 only."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out
        results.append(json.loads(lines[0][len("RESULT "):]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    for out, r in zip(outputs, results):
        assert r["world"] == 2 and r["initialized"] and not r["after_shutdown"]
        assert r["local"] == r["rank"] and r["main"] == (r["rank"] == 0)
        assert r["sum"] == [3.0] and r["in_place"] and r["device"] == "cpu"
        assert ("PRINT0-MARKER" in out) == (r["rank"] == 0)


def test_the_download_cache_follows_the_environment(monkeypatch, tmp_path):
    """$PFGMPP_CACHE_DIR, else $XDG_CACHE_HOME/pfgmpp (the XDG base directory rule), else ~/.cache/pfgmpp."""
    monkeypatch.delenv("PFGMPP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert util.cache_dir() == tmp_path / "home" / ".cache" / "pfgmpp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert util.cache_dir() == tmp_path / "xdg" / "pfgmpp"
    monkeypatch.setenv("PFGMPP_CACHE_DIR", str(tmp_path / "own"))
    assert util.cache_dir() == tmp_path / "own"


def test_stale_temporaries_are_those_of_dead_writers_on_this_machine(tmp_path):
    """A temporary named by a process that has exited is stale; ours, another machine's or a foreign name are not."""
    target = tmp_path / "data.zip"
    done = subprocess.Popen(["true"])
    done.wait()
    host = socket.gethostname()
    names = {"dead": f".tmp-data.zip.{host}.{done.pid}.ab12", "live": f".tmp-data.zip.{host}.{os.getpid()}.ab12",
             "other host": f".tmp-data.zip.elsewhere.{done.pid}.ab12", "foreign": ".tmp-data.zip.ab12cd34",
             "other target": f".tmp-data.zip2.{host}.{done.pid}.ab12"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in util.stale_temporaries(target)] == [names["dead"]]
    assert util.temporary_path(target).name.startswith(f".tmp-data.zip.{host}.{os.getpid()}.")


def test_check_output_refuses_before_any_work(tmp_path):
    existing = tmp_path / "ref.npz"
    existing.write_bytes(b"keep")
    with pytest.raises(ValueError, match="--overwrite"):
        util.check_output(existing, "--dest")
    assert util.check_output(existing, "--dest", overwrite=True) == existing and existing.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="its folder does not exist"):
        util.check_output(tmp_path / "no" / "x.npz", "--dest")
    with pytest.raises(ValueError, match="is a folder"):
        util.check_output(tmp_path, "--dest")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Files are created as open() creates them (0666 masked by the umask), not 0600 as a private temp file."""
    mask = os.umask(0o022)
    try:
        with util.atomic_write(tmp_path / "x.png") as f:
            f.write(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644


def test_default_workers_follow_the_cores_of_a_rank(monkeypatch):
    """No more loader processes than a rank's share of the cores, less one for the rank itself (no DataLoader warning)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.default_workers(3) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert distributed.default_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.cpus_per_rank() == 8 and distributed.default_workers(16) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert distributed.default_workers(3) == 0


# ----------------------------------------------------------------------------------------------
# Counter-based streams (training's per-sample draws)


def _splitmix64(z: int) -> int:
    """Reference SplitMix64 finaliser on Python integers (exact modulo 2^64)."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_counter_streams_are_splitmix64_exactly():
    """The int64 tensor arithmetic (wrapping products, masked shifts) equals SplitMix64 on unbounded integers."""
    streams = rng.sample_streams((3, 7, 0), range(5, 9))
    keys = [int(k) % 2**64 for k in streams.keys]
    values = streams.bits(4)
    for b, key in enumerate(keys):
        expected = [_splitmix64((key + j * 0x9E3779B97F4A7C15) % 2**64) for j in range(1, 5)]
        assert [int(v) % 2**64 for v in values[b]] == expected


def test_a_row_depends_on_its_position_alone():
    """Rows 4..7 drawn alone equal rows 4..7 of the batch 0..7, draw after draw (normal, then uniform)."""
    whole, part = rng.sample_streams((1, 2, 3), range(8)), rng.sample_streams((1, 2, 3), range(4, 8))
    assert torch.equal(rng.randn([8, 3, 2], whole)[4:], rng.randn([4, 3, 2], part))
    assert torch.equal(rng.rand([8], whole, dtype=torch.float64)[4:], rng.rand([4], part, dtype=torch.float64))
    other_step = rng.sample_streams((1, 3, 3), range(4, 8))
    assert not torch.equal(rng.randn([4, 3, 2], other_step), rng.randn([4, 3, 2], rng.sample_streams((1, 2, 3), range(4, 8))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counter_stream_distributions(dtype):
    """Normal and uniform draws against scipy (KS), across rows and within rows; uniforms in the open (0, 1)."""
    import scipy.stats

    streams = rng.sample_streams((11, 0, 0), range(400))
    z = rng.randn([400, 500], streams, dtype=dtype).double()
    u = rng.rand([400, 500], streams, dtype=dtype).double()
    assert scipy.stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert scipy.stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    assert scipy.stats.kstest(z[:, 0].numpy(), "norm").pvalue > 1e-3  # across streams, one position
    assert 0 < u.min() and u.max() < 1
    rows = torch.corrcoef(z[:, :50].T)  # neighbouring positions and neighbouring streams are uncorrelated
    cols = torch.corrcoef(z[:50])
    off = ~torch.eye(50, dtype=torch.bool)
    assert rows[off].abs().max() < 0.25 and cols[off].abs().max() < 0.25
    assert abs(float(rows[off].mean())) < 0.01 and abs(float(cols[off].mean())) < 0.01


def test_counter_streams_refuse_a_mismatched_batch():
    with pytest.raises(ValueError, match="one stream per sample"):
        rng.randn([3, 2], rng.sample_streams((0,), range(4)))


def test_ranks_sharing_a_gpu_are_named():
    """Two local ranks on one GPU (a wrong NPROC_PER_NODE or CUDA_VISIBLE_DEVICES): the groups that share one."""
    assert distributed.shared_devices({0: "GPU-a", 1: "GPU-b"}) == []
    assert distributed.shared_devices({0: "GPU-a", 1: "GPU-a", 2: "GPU-b", 3: "GPU-b", 4: "GPU-c"}) == [[0, 1], [2, 3]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_local_rank_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ValueError, match="has no GPU of its own"):
        distributed.init()
