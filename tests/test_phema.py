"""Power-function EMA and post-hoc reconstruction (training/phema.py, reconstruct_phema.py) against the mathematics
of EDM2 (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024, section 3 and
appendix C): the profile's closed forms, a float64 average of a recorded history, numerical integration, and EMAs
tracked directly beside the ones the reconstruction is given."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import scipy.integrate
import torch
from click.testing import CliRunner

import reconstruct_phema
from tests.helpers import tiny_network
from training import checkpoint, phema

# EDM2's own conversion (NVlabs/edm2 training/phema.py `std_to_exp`, np.roots of the cubic of eq. 126), run on
# sigma_rel 0.05 and 0.10; the paper quotes gamma = 16.97 and 6.94 for its two tracked profiles (section 3.1).
EDM2_GAMMA = {0.05: 16.972198602303447, 0.10: 6.937203937601809}
# EDM2's `solve_posthoc_coefficients` for snapshots of 0.05 and 0.10 at t = 1000, 2000, 3000, 4000, reconstructing
# 0.07 and 0.15 at t = 4000 (rows: the 0.05 snapshots in time order, then the 0.10 ones), run with numpy 2.4.
EDM2_WEIGHTS = np.array([
    [1.8701727360587484e-08, -5.6203510794240741e-04], [8.3507393494743285e-05, -1.3147865594997876e-02],
    [1.0685739328585101e-02, -7.7958372150210578e-02], [4.3456714018574205e-01, -2.6406197079986715e-01],
    [-4.5939870751597861e-07, 1.9440693037546355e-03], [-5.6804806058711403e-04, 3.8019966635525246e-02],
    [-4.3921235646810192e-02, 2.0040864007962381e-01], [5.9915333749655564e-01, 1.1153575676341143e+00]])


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.01, 0.05, 0.1, 0.2, 0.28, 0.2886, math.sqrt(1 / 12)])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-13)
    s = sigma_rel ** -2  # eq. 126's cubic: its largest real root
    roots = np.roots([1, 7, 16 - s, 12 - s])
    assert gamma == pytest.approx(roots[np.abs(roots.imag) < 1e-9].real.max(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("sigma_rel, gamma", EDM2_GAMMA.items())
def test_gamma_equals_edm2(sigma_rel, gamma):
    assert phema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, rel=1e-13)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-13)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.29, math.nan, math.inf])
def test_invalid_sigma_rel_names_the_range(sigma_rel):
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0\.2887\]"):
        phema.sigma_rel_to_gamma(sigma_rel)


class Toy(torch.nn.Module):
    """A parameter vector and a buffer."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(size))
        self.register_buffer("count", torch.zeros([]))


def random_walk(net: Toy, generator: torch.Generator, steps: int, batches: list[int], ema: phema.PowerFunctionEMA,
                start_nimg: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """`steps` random optimizer steps (batch sizes cycling through `batches`), each followed by the EMA update."""
    history, times, nimg = [], [], start_nimg
    for k in range(steps):
        with torch.no_grad():
            net.w.add_(torch.randn(net.w.shape, generator=generator) + 0.3)
            net.count.add_(1)
        nimg += batches[k % len(batches)]
        ema.update(net, nimg, batches[k % len(batches)])
        history.append(net.w.detach().double().clone())
        times.append(nimg)
    return history, times


def test_ema_is_the_power_weighted_average_of_the_history():
    """The weight of the parameters after the step ending at t_i is the profile's integral over (t_(i-1), t_i]:
    (t_i^(gamma+1) - t_(i-1)^(gamma+1)) / t^(gamma+1), i.e. weights proportional to t^gamma (eq. 121)."""
    net, sigma_rels = Toy(), [0.05, 0.10]
    ema = phema.PowerFunctionEMA(net, sigma_rels)
    history, times = random_walk(net, torch.Generator().manual_seed(1), 300, [256, 512, 768], ema)
    t = np.array([0, *times], dtype=np.float64)
    for sigma_rel in sigma_rels:
        g = phema.sigma_rel_to_gamma(sigma_rel)
        weights = np.diff((t / t[-1]) ** (g + 1))
        direct = sum(float(w) * theta for w, theta in zip(weights, history))
        tracked = ema.module(sigma_rel).w.double()
        assert (tracked - direct).norm() / direct.norm() < 2e-6
        assert torch.equal(ema.module(sigma_rel).count, net.count)
    assert ema.module(0.1) is ema.items()[1][1]


def test_resume_from_state_dict_is_bitwise_exact():
    generator, net = torch.Generator().manual_seed(2), Toy()
    whole = phema.PowerFunctionEMA(net, [0.05, 0.1])
    random_walk(net, generator, 200, [100], whole)

    generator, net = torch.Generator().manual_seed(2), Toy()
    first = phema.PowerFunctionEMA(net, [0.05, 0.1])
    random_walk(net, generator, 120, [100], first)
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "phema": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_net = Toy()
    resumed_net.load_state_dict(state["net"])
    resumed = phema.PowerFunctionEMA(resumed_net, [0.05, 0.1])
    resumed.load_state_dict(state["phema"])
    random_walk(resumed_net, generator, 80, [100], resumed, start_nimg=120 * 100)
    for (_, a), (_, b) in zip(whole.items(), resumed.items()):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="resume with the same profiles"):
        phema.PowerFunctionEMA(Toy(), [0.05, 0.2]).load_state_dict(state["phema"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_on_cuda_needs_no_host_sync_and_equals_the_cpu():
    nets = {device: Toy().to(device) for device in ("cpu", "cuda")}
    emas = {device: phema.PowerFunctionEMA(net, [0.05, 0.1]) for device, net in nets.items()}
    steps = torch.randn([20, 64], generator=torch.Generator().manual_seed(3))
    steps = {device: steps.to(device) for device in nets}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for device, net in nets.items():
            for k, step in enumerate(steps[device]):
                with torch.no_grad():
                    net.w.add_(step)
                emas[device].update(net, (k + 1) * 64, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (_, cpu), (_, cuda) in zip(emas["cpu"].items(), emas["cuda"].items()):
        torch.testing.assert_close(cuda.w.cpu(), cpu.w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sigma_rels, message", [([0.0725], "more than three decimals"), ([0.05, 0.050], "twice"),
                                                  ([], "at least one")])
def test_tracked_profiles_are_checked(sigma_rels, message):
    with pytest.raises(ValueError, match=message):
        phema.PowerFunctionEMA(Toy(), sigma_rels)


@pytest.mark.parametrize("t_a, s_a, t_b, s_b", [(3000, 0.05, 5000, 0.10), (5000, 0.10, 3000, 0.05), (1, 0.2, 1, 0.2),
                                                (7.5, 0.01, 8, 0.25), (100, 0.288, 40, 0.15)])
def test_inner_products_against_quadrature(t_a, s_a, t_b, s_b):
    def profile(tau, T, s):  # eq. 121
        g = phema.sigma_rel_to_gamma(s)
        return (g + 1) * tau ** g / T ** (g + 1)

    numeric, _ = scipy.integrate.quad(lambda tau: profile(tau, t_a, s_a) * profile(tau, t_b, s_b), 0, min(t_a, t_b),
                                      epsabs=0, epsrel=1e-12, limit=200)
    assert phema.inner_products(t_a, s_a, t_b, s_b) == pytest.approx(numeric, rel=1e-9)


def test_weights_equal_edm2s_solve():
    times, sigmas = [1000, 2000, 3000, 4000] * 2, [0.05] * 4 + [0.10] * 4
    weights, residual = phema.solve_weights(times, sigmas, [4000, 4000], [0.07, 0.15])
    np.testing.assert_allclose(weights, EDM2_WEIGHTS, rtol=1e-8, atol=1e-14)
    assert np.all((residual > 0.01) & (residual < 0.2))


# ------------------------------------------------------------------------------------------------
# Reconstruction from snapshots of a tiny network following a random walk. One step = 1000 images, so kimg = step
# and the names hold exact times. 32 snapshot times as EDM2's published raw snapshots (every 64Mi of 2Gi images).

STEPS, EVERY, TRACKED, UNTRACKED = 160, 5, (0.05, 0.10), (0.07, 0.15)


def snapshot_walk(folder, steps: int = STEPS, images: int = 1000, provenance: bool = False):
    """Snapshots of TRACKED every EVERY steps of `images` images each of a tiny network following a random walk (with
    their exact kimg in the provenance when `provenance`); the EMAs of UNTRACKED tracked directly beside them."""
    torch.manual_seed(0)
    net = tiny_network()
    tracked, untracked = phema.PowerFunctionEMA(net, TRACKED), phema.PowerFunctionEMA(net, UNTRACKED)
    generator = torch.Generator().manual_seed(5)
    drift = [torch.randn(p.shape, generator=generator) for p in net.parameters()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, d in zip(net.parameters(), drift):
                p.add_(0.01 * (d + torch.randn(p.shape, generator=generator)))
        tracked.update(net, step * images, images)
        untracked.update(net, step * images, images)
        if step % EVERY == 0:
            for sigma_rel, ema in tracked.items():
                origin = {"kimg": step * images / 1000} if provenance else None
                checkpoint.save_network(folder / phema.snapshot_name(step * images // 1000, sigma_rel), ema, origin)
    return untracked, net


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`snapshot_walk` in a folder: the snapshots, and the directly tracked EMAs of UNTRACKED."""
    folder = tmp_path_factory.mktemp("run")
    return (folder, *snapshot_walk(folder))


def flat(module_or_state) -> torch.Tensor:
    """Every parameter and buffer, float64, in one vector."""
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return torch.cat([v.double().flatten() for v in state.values()])


def reconstructed(folder, sigma_rels, kimg=None, keep=lambda s: True) -> tuple[phema.Reconstruction, dict]:
    plan = phema.plan_reconstruction([s for s in phema.find_snapshots(folder) if keep(s)], sigma_rels, kimg)
    return plan, {plan.sigma_rel[j]: net for j, net in phema.reconstruct(plan, batch=1)}


@pytest.mark.parametrize("sigma_rel, kimg", [(0.05, STEPS), (0.10, STEPS), (0.10, 80), (0.05, EVERY)])
def test_a_tracked_profile_at_a_snapshot_time_is_that_snapshot(run, sigma_rel, kimg):
    folder = run[0]
    plan, nets = reconstructed(folder, [sigma_rel], kimg)
    assert plan.residual[0] < 1e-6 and len(plan.snapshots) == 2 * kimg // EVERY
    stored = checkpoint.read_checkpoint(folder / phema.snapshot_name(kimg, sigma_rel))[1]
    assert (flat(nets[sigma_rel]) - flat(stored)).norm() / flat(stored).norm() <= 1e-5


def test_an_untracked_profile_equals_its_directly_tracked_ema(run):
    """Measured (float64 norms over all weights): relative to the EMA, 1.6e-6 (0.07) and 2.0e-5 (0.15); relative to
    the EMA's distance from the raw weights, 2.1e-5 and 9.5e-5. Fit residuals of the profiles: 9.8e-4 and 2.3e-3."""
    folder, untracked, net = run
    plan, nets = reconstructed(folder, list(UNTRACKED))
    for j, sigma_rel in enumerate(UNTRACKED):
        direct, raw = flat(untracked.module(sigma_rel)), flat(net)
        error = (flat(nets[sigma_rel]) - direct).norm()
        print(f"sigma_rel {sigma_rel}: residual {plan.residual[j]:.2e}, error / |ema| {error / direct.norm():.2e}, "
              f"error / |ema - raw| {error / (direct - raw).norm():.2e}")
        assert plan.residual[j] < 5e-3
        assert error / direct.norm() < 1e-4 and error / (direct - raw).norm() < 5e-4


def test_too_few_snapshots_fit_poorly_and_say_so(run):
    """The last snapshot time alone: residuals 0.056 (0.07) and 0.25 (0.15); errors 0.14 and 0.27 of |ema - raw|."""
    folder, untracked, net = run
    plan, nets = reconstructed(folder, list(UNTRACKED), keep=lambda s: s.kimg == STEPS)
    assert np.all(plan.residual > phema.FIT_WARNING)
    for sigma_rel in UNTRACKED:
        direct = flat(untracked.module(sigma_rel))
        assert (flat(nets[sigma_rel]) - direct).norm() / (direct - flat(net)).norm() > 0.05


def cli(*args):
    return CliRunner().invoke(reconstruct_phema.main, [str(a) for a in args])


def test_cli_writes_skips_and_refuses(run, tmp_path):
    folder, untracked, _ = run
    out = tmp_path / "out"
    result = cli(f"--indir={folder}", f"--outdir={out}", "--outstd=0.07,0.15", "--batch=1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"phema-{STEPS:06d}-0.070.pt", f"phema-{STEPS:06d}-0.150.pt"]
    assert f"kimg {EVERY:06d}: sigma_rel 0.050, 0.100" in result.output and "relative residual" in result.output
    net = checkpoint.load_network(out / f"phema-{STEPS:06d}-0.070.pt")
    assert net.provenance["phema"]["sigma_rel"] == 0.07 and len(net.provenance["phema"]["inputs"]) == 2 * STEPS // EVERY
    direct = flat(untracked.module(0.07))
    assert (flat(net) - direct).norm() / direct.norm() < 1e-4

    before = (out / f"phema-{STEPS:06d}-0.070.pt").stat().st_mtime_ns
    result = cli(f"--indir={folder}", f"--outdir={out}", "--outstd=0.07,0.10", "--skip", "--outkimg=80")
    assert result.exit_code == 0 and "skipping" not in result.output and (out / "phema-000080-0.100.pt").exists()
    result = cli(f"--indir={folder}", f"--outdir={out}", "--outstd=0.07", "--skip")
    assert result.exit_code == 0 and "skipping" in result.output and "Nothing to do" in result.output
    assert (out / f"phema-{STEPS:06d}-0.070.pt").stat().st_mtime_ns == before

    result = cli(f"--indir={folder}", f"--outdir={out}", "--outstd=0.07")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "--overwrite" in result.output
    result = cli(f"--indir={folder}", f"--outdir={out}", "--outstd=0.07", "--overwrite")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["--outstd=0.3"], "sigma_rel must be in"),
    (["--outstd=0.1", "--outkimg=7"], "no snapshot at that time"),
    (["--outstd=0.1", "--skip", "--overwrite"], "give one of them"),
    (["--outstd=0.05", "--outprefix=network-snapshot", "--outdir=INDIR", "--overwrite"], "is an input snapshot"),
])
def test_cli_errors_are_one_line(run, tmp_path, args, message):
    folder = run[0]
    result = cli(f"--indir={folder}", f"--outdir={tmp_path}", *[a.replace("INDIR", str(folder)) for a in args])
    assert result.exit_code in (1, 2) and message in result.output and "Traceback" not in result.output


def test_cli_on_a_folder_without_snapshots(tmp_path):
    result = cli(f"--indir={tmp_path}", f"--outdir={tmp_path / 'out'}", "--outstd=0.1")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "no power-function EMA snapshots" in result.output


def test_cli_warns_when_the_snapshots_are_too_few(run, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for sigma_rel in TRACKED:
        name = phema.snapshot_name(STEPS, sigma_rel)
        (folder / name).write_bytes((run[0] / name).read_bytes())
    result = cli(f"--indir={folder}", f"--outdir={tmp_path / 'out'}", "--outstd=0.15")
    assert result.exit_code == 0 and "warning: sigma_rel 0.150 is fitted poorly" in result.output


def test_sigma_rel_lists():
    assert phema.expand_sigma_rel_list("0.010,0.015,...,0.030") == [0.01, 0.015, 0.02, 0.025, 0.03]
    assert phema.expand_sigma_rel_list("0.1,0.05,0.1") == [0.05, 0.1]
    for bad in ("0.1,...", "0.01,0.02,...,0.035", "x", ""):
        with pytest.raises(ValueError):
            phema.expand_sigma_rel_list(bad)


# ------------------------------------------------------------------------------------------------
# Exact training times: steps of 1536 images, so a name's kimg (images // 1000) is rounded down.

def test_the_reconstruction_uses_each_snapshots_exact_time(tmp_path):
    """Names round 1536 images per step down to kimg; the provenance's exact times keep the untracked profiles
    accurate, the names' alone do not. Measured (16 snapshot times, error relative to |ema - raw|): exact times
    3.0e-4 (0.07) and 1.1e-3 (0.15); the names' rounded times 4.7e-3 and 1.8e-3."""
    errors = {}
    for provenance in (True, False):
        folder = tmp_path / str(provenance)
        folder.mkdir()
        untracked, net = snapshot_walk(folder, steps=80, images=1536, provenance=provenance)
        snapshots = phema.find_snapshots(folder)
        assert all((s.nimg == round(s.t * 1000) and s.nimg % 1536 == 0) if provenance else s.nimg is None for s in snapshots)
        plan, nets = reconstructed(folder, list(UNTRACKED))
        assert plan.t == pytest.approx(80 * 1.536 if provenance else 122)
        errors[provenance] = [float((flat(nets[s]) - flat(untracked.module(s))).norm() /
                                    (flat(untracked.module(s)) - flat(net)).norm()) for s in UNTRACKED]
    assert all(e < 2e-3 for e in errors[True]), errors
    assert all(rounded > 1.5 * exact for exact, rounded in zip(errors[True], errors[False])), errors
