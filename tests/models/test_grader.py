"""Tests for the grading network: paper shapes and size, masking of missing volumes and padded
slices, both aggregation variants, gradients, bf16 autocast and channels-last on CPU."""

from __future__ import annotations

import pytest
import torch

from models.grader import CONDITIONS, GRADES, LEVELS, Grader, GraderConfig

SMALL = (64, 128)  # H, W for the tests that are not about the paper configuration
VARIANTS = ("transformer", "attention")


def _inputs(b: int, m: int, s: int, hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random volumes, all present; views alternate sagittal/axial, levels cycle."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "volumes": torch.randn(b, m, s, *hw, generator=gen),
        "present": torch.ones(b, m, dtype=torch.bool),
        "views": (torch.arange(m) % 2).repeat(b, 1),
        "levels": torch.arange(b) % len(LEVELS),
    }


def _small(aggregate: str = "transformer") -> Grader:
    """A width-16 grader in eval mode, fixed initialisation."""
    torch.manual_seed(0)
    return Grader(GraderConfig(width=16, aggregate=aggregate)).eval()  # type: ignore[arg-type]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], row: int | slice = slice(None)) -> None:
    """Every head's logits agree (for the given batch rows)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name][row], b[name][row], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def paper() -> Grader:
    """The paper's configuration (width 64: 512-d slice embeddings)."""
    torch.manual_seed(0)
    return Grader().eval()


def test_paper_config_shapes(paper: Grader) -> None:
    assert paper.config.embed_dim == 512 and paper.config.feedforward == 2048
    inputs = _inputs(2, 3, 9, (112, 224))
    inputs["present"][1] = torch.tensor([False, True, False])  # a lone axial volume
    with torch.no_grad():
        tokens, valid = paper.tokens(**inputs)
        out = paper(**inputs)
    assert tokens.shape == (2, 27, 512) and valid.sum(1).tolist() == [27, 9]
    assert list(out) == [*CONDITIONS, "level"]
    for name in CONDITIONS:
        assert out[name].shape == (2, len(GRADES))
    assert out["level"].shape == (2, len(LEVELS))


def test_parameter_count_paper(paper: Grader) -> None:
    # torchvision resnet18 11,689,512 - 2*64*49 (1-channel stem) - 513,000 (no fc)
    assert sum(p.numel() for p in paper.encoder.parameters()) == 11_170_240
    # encoder + embeddings (9+1 + 2+1 + 5+1)*512 + CLS 512
    # + 3 layers * 3,152,384 (attention 1,050,624, feed-forward 2,099,712, norms 2,048)
    # + final norm 1,024 + heads 5*(512*3+3) + (512*5+5)
    assert paper.parameter_count() == 20_648_916
    # attention variant: encoder + embeddings + score Linear(512, 1) + heads
    assert Grader(GraderConfig(aggregate="attention")).parameter_count() == 11_190_741


@pytest.mark.parametrize("aggregate", VARIANTS)
def test_missing_volume_is_masked(aggregate: str) -> None:
    model = _small(aggregate)
    inputs = _inputs(2, 3, 3, SMALL)
    inputs["present"][0, 1] = False
    noisy = {**inputs, "volumes": inputs["volumes"].clone()}
    noisy["volumes"][0, 1] = torch.randn(3, *SMALL) * 100
    nan = {**inputs, "volumes": inputs["volumes"].clone()}
    nan["volumes"][0, 1] = float("nan")  # never reaches the encoder
    zeros = {**inputs, "volumes": inputs["volumes"].clone()}
    zeros["volumes"][0, 1] = 0.0
    with torch.no_grad():
        reference = model(**zeros)
        _close(reference, model(**noisy))
        _close(reference, model(**nan))
        dropped = model(**{key: value[:, [0, 2]] if value.dim() > 1 else value for key, value in inputs.items()})
    _close(reference, dropped, row=0)  # same as never having the slot, other than slot indices


@pytest.mark.parametrize("aggregate", VARIANTS)
def test_axial_only(aggregate: str) -> None:
    model = _small(aggregate)
    inputs = _inputs(1, 3, 4, SMALL)
    inputs["present"][:] = torch.tensor([[False, True, False]])  # views (0, 1, 0): axial only
    with torch.no_grad():
        out = model(**inputs)
    assert all(torch.isfinite(logits).all() for logits in out.values())


@pytest.mark.parametrize("aggregate", VARIANTS)
def test_padded_slices_match_short_volume(aggregate: str) -> None:
    model = _small(aggregate)
    padded = _inputs(2, 1, 9, SMALL)
    mask = torch.ones(2, 1, 9, dtype=torch.bool)
    mask[:, :, 5:] = False
    short = {**padded, "volumes": padded["volumes"][:, :, :5]}
    padded["volumes"][:, :, 5:] = float("nan")
    with torch.no_grad():
        _close(model(**padded, slice_mask=mask), model(**short))


def test_slice_counts_run() -> None:
    model = _small()
    with torch.no_grad():
        for s in (1, 5, 9):
            out = model(**_inputs(1, 1, s, SMALL))
            assert out["level"].shape == (1, len(LEVELS))


@pytest.mark.parametrize("aggregate", VARIANTS)
def test_gradients_reach_every_part(aggregate: str) -> None:
    model = _small(aggregate).train()
    inputs = _inputs(2, 2, 3, SMALL)
    out = model(**inputs)
    loss = sum(torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)) for logits in out.values())
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    stem = model.encoder.stem[0]
    assert isinstance(stem, torch.nn.Conv2d)
    pooling = model.cls if aggregate == "transformer" else model.pool_score.weight if model.pool_score else None
    for p in (stem.weight, model.slice_embed.weight, model.view_embed.weight, model.level_embed.weight, pooling):
        assert p is not None and p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("aggregate", VARIANTS)
def test_bf16_autocast_and_channels_last(aggregate: str) -> None:
    model = _small(aggregate)
    inputs = _inputs(2, 2, 4, SMALL)
    with torch.no_grad():
        reference = model(**inputs)
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        _close(reference, model(**inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
    for name, logits in out.items():
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits.float(), reference[name], rtol=0.1, atol=0.15)


def test_rejects_bad_inputs() -> None:
    model = _small()
    with pytest.raises(ValueError, match="max_slices"):
        model(**_inputs(1, 1, 10, SMALL))
    inputs = _inputs(1, 2, 3, SMALL)
    inputs["present"][:] = False
    with pytest.raises(ValueError, match="at least one present slice"):
        model(**inputs)
    with pytest.raises(ValueError, match="aggregate"):
        GraderConfig(aggregate="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads"):
        GraderConfig(width=1, heads=3)
