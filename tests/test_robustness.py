"""The robustness study's perturbations and `fid.py robustness`: alpha = 0 and 32 bits change nothing (bitwise), the
injected noise has the stated law at the stated place, quantised weights take at most 2^B values with the excluded
layers untouched, the images stay seeded, and a killed study resumes without recomputing."""

import json
import math

import pytest
import scipy.stats
import torch
from click.testing import CliRunner

import fid
from tests.detector_fixtures import stand_in_reference
from tests.helpers import tiny_network
from tests.oracles import AnalyticDenoiser
from torch_utils import rng
from training import checkpoint, generation, robustness
from training.generation import quantize
from training.samplers import SamplerSettings

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
PERTURBABLE = ("heun", "euler", "dpmpp-2m", "dpmpp-3m", "unipc", "restart")


def _points() -> torch.Tensor:
    return torch.randn([8, 1, 2, 2], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("solver", PERTURBABLE)
def test_alpha_zero_is_the_unperturbed_sampler_bitwise(solver):
    net = AnalyticDenoiser(_points(), 128)
    settings = SamplerSettings(solver, {"num_steps": 6})
    latents = settings.prior_latents(net, rng.seeded_generators(range(4)))
    plain = settings.sample(net, latents, generator=rng.seeded_generators(range(4)))
    zero = SamplerSettings(solver, {"num_steps": 6, "perturb_alpha": 0.0})
    assert torch.equal(zero.sample(net, latents, generator=rng.seeded_generators(range(4))), plain)
    noisy = SamplerSettings(solver, {"num_steps": 6, "perturb_alpha": 0.3})
    assert not torch.equal(noisy.sample(net, latents, generator=rng.seeded_generators(range(4))), plain)


class _Recorder(AnalyticDenoiser):
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.seen = getattr(self, "seen", []) + [x.clone()]
        return super().forward(x, sigma)


@pytest.mark.parametrize("solver", ["heun", "dpmpp-2m"])
def test_injected_noise_is_alpha_sigma_normal_at_the_start_of_the_step(solver):
    """The network's first input is x_0 + alpha sigma_0 eps with eps the generator's first draw, and eps ~ N(0, I)."""
    net = _Recorder(_points(), 128)
    alpha, count = 0.2, 4000
    settings = SamplerSettings(solver, {"num_steps": 2, "perturb_alpha": alpha})
    latents = settings.prior_latents(net, rng.seeded_generators(range(count))).double()
    settings.sample(net, latents, generator=rng.seeded_generators(range(10**6, 10**6 + count)))
    eps = rng.randn(latents.shape, rng.seeded_generators(range(10**6, 10**6 + count)), dtype=torch.float64)
    sigma_0 = 80.0
    torch.testing.assert_close(net.seen[0], latents + alpha * sigma_0 * eps, rtol=1e-12, atol=1e-9)
    drawn = ((net.seen[0] - latents) / (alpha * sigma_0)).flatten().numpy()
    assert scipy.stats.kstest(drawn, "norm").pvalue > 1e-3


def test_perturbed_samples_do_not_depend_on_the_batch():
    net = AnalyticDenoiser(_points(), 8)
    settings = SamplerSettings("unipc", {"num_steps": 6, "perturb_alpha": 0.1})

    def run_(seeds):
        latents = settings.prior_latents(net, rng.seeded_generators(seeds))
        return settings.sample(net, latents, generator=rng.seeded_generators([s + 7 for s in seeds]))

    seeds = list(range(6))
    torch.testing.assert_close(run_(seeds), torch.cat([run_(seeds[:2]), run_(seeds[2:])]), rtol=0, atol=1e-12)


def test_alpha_is_refused_where_it_has_no_step():
    with pytest.raises(ValueError, match="perturb_alpha does not apply to the solver rk45"):
        SamplerSettings("rk45", {"perturb_alpha": 0.1})


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_quantised_weights_take_at_most_2_to_the_b_values_and_the_rest_is_untouched(bits):
    torch.manual_seed(0)
    net = tiny_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = quantize.quantize(net, bits)
    names = set(quantize.quantized_names(net))
    assert names and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the original is kept
    for name, param in copy.named_parameters():
        original = dict(net.named_parameters())[name]
        if name in names:
            assert param.unique().numel() <= 2**bits and not torch.equal(param, original)
            assert (param - original).abs().max() <= (original.max() - original.min()) / (2**bits - 1) + 1e-6
        else:  # biases, normalisations, affines, the mapping network: as they were
            assert torch.equal(param, original), name
    assert not any(s in n for n in names for s in quantize.SKIP)


def test_32_bits_or_none_is_the_network_itself(tmp_path):
    torch.manual_seed(0)
    checkpoint.save_network(tmp_path / "net.pt", tiny_network())
    settings = SamplerSettings("heun", {"num_steps": 3})
    plain = generation.load_guided(str(tmp_path / "net.pt"), "cpu")
    full = generation.load_guided(str(tmp_path / "net.pt"), "cpu", quantize_bits=32)
    images = [generation.sample_seeds(n, [0, 1], "cpu", settings)[0] for n in (plain, full)]
    assert torch.equal(images[0], images[1])
    assert quantize.quantize(plain, None) is plain and quantize.quantize(plain, 32) is plain


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    for i, D in enumerate([2.0, math.inf]):
        torch.manual_seed(i)
        checkpoint.save_network(root / f"D{i}.pt", tiny_network(D=D))
    detector, ref = stand_in_reference(root)
    args = ["robustness", f"--networks={root / 'D0.pt'},{root / 'D1.pt'}", "--seeds=0-5", f"--ref={ref}",
            f"--detector={detector}", "--metrics=kid", "--batch=6", "--steps=3", "--alphas=0,0.2",
            "--steps_axis=2,3", "--bits_axis=4"]
    yield dict(root=root, args=args)
    torch.set_num_threads(threads)


def _invoke(args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])


def test_a_killed_study_resumes_without_recomputing(study, tmp_path, count_evaluations):
    calls = count_evaluations
    calls["fail_at"] = 4
    out = tmp_path / "study.json"
    killed = _invoke([*study["args"], f"--out={out}", f"--plot={tmp_path / 'study.png'}"])
    assert killed.exit_code != 0
    assert len(json.loads(out.read_text())["records"]) == 3  # written as each cell finished
    calls.update(count=0, fail_at=None)
    result = _invoke([*study["args"], f"--out={out}", f"--plot={tmp_path / 'study.png'}"])
    assert result.exit_code == 0, result.output
    assert calls["count"] == 2 * 5 - 3  # 2 networks x 5 cells, 3 already done
    records = json.loads(out.read_text())["records"]
    assert len(records) == 10 and {r["D"] for r in records} == {"2", "inf"}
    assert {(r["axis"], r["value"]) for r in records} == {("alpha", 0), ("alpha", 0.2), ("steps", 2), ("steps", 3),
                                                          ("bits", 4)}
    table = (tmp_path / "study.md").read_text()
    assert "| D = 2 (D0.pt) |" in table and "| D = inf (D1.pt) |" in table and "4 bits" in table and "NFE 5" in table
    assert (tmp_path / "study.png").stat().st_size > 0
    # Done: nothing to evaluate again. A replaced network file (same path) is evaluated again.
    calls["count"] = 0
    assert _invoke([*study["args"], f"--out={out}"]).exit_code == 0 and calls["count"] == 0
    torch.manual_seed(9)
    checkpoint.save_network(study["root"] / "D1.pt", tiny_network(D=math.inf))
    assert _invoke([*study["args"], f"--out={out}"]).exit_code == 0 and calls["count"] == 5


def test_the_study_cell_equals_fid_gen_with_the_same_options(study, tmp_path):
    out = tmp_path / "study.json"
    args = [a for a in study["args"] if not a.startswith(("--alphas", "--steps_axis", "--bits_axis"))]
    assert _invoke([*args, "--alphas=0.2", f"--out={out}"]).exit_code == 0
    cell = [r for r in json.loads(out.read_text())["records"] if r["D"] == "2"][0]
    gen = [a for a in args[2:]] + [f"--network={study['root'] / 'D0.pt'}", "--perturb_alpha=0.2",
                                   f"--out={tmp_path / 'gen.json'}"]
    assert _invoke(["gen", *gen]).exit_code == 0
    assert json.loads((tmp_path / "gen.json").read_text())["results"] == cell["results"]


@pytest.mark.parametrize("extra, message", [
    ([], "give at least one axis"), (["--alphas=-1"], "alphas must be"), (["--bits_axis=40"], "bit widths"),
    (["--alphas=0.1", "--solver=rk45"], "perturb_alpha does not apply"), (["--alphas=a"], "comma-separated float"),
])  # fmt: skip
def test_bad_study_options_are_one_line_errors(study, tmp_path, extra, message):
    args = [a for a in study["args"] if not a.startswith(("--alphas", "--steps", "--bits_axis"))]
    result = _invoke([*args, *extra, f"--out={tmp_path / 'x.json'}"])
    assert result.exit_code != 0 and "Traceback" not in result.output and message in result.output, result.output
    assert not (tmp_path / "x.json").exists()


def test_records_of_another_file_format_are_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "pfgmpp-fid-sweep", "version": 1, "records": []}))
    with pytest.raises(ValueError, match="not a robustness study's file"):
        robustness.Records.load(tmp_path / "x.json")
