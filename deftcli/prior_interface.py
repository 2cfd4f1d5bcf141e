"""What every diffusion prior provides: a score s_θ(x, t) ≈ ∇ log p_t(x), its SDE, its image shape and its identity.

The formats live in their own modules (:mod:`deftcli.priors` with the loader, :mod:`deftcli.gmm`,
:mod:`deftcli.diffusers_prior`); they all subclass :class:`Prior`, so none needs another to be imported first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

from .samplers import ScoreFn
from .sde import VPSDE
from .tuning import PriorTuning

if TYPE_CHECKING:
    from .data import ImageDataset


class Prior(nn.Module):
    """Interface of a prior: ``score(x, t)``, ``sde``, ``image_shape`` (C, H, W), ``name``, ``identity()``."""

    sde: VPSDE
    image_shape: tuple[int, int, int]
    name: str
    tuning: PriorTuning | None = None
    """The prior's ``tuning.json`` (:mod:`deftcli.tuning`): settings selected for it on training images."""

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a run records to name the exact prior it was fine-tuned on."""
        raise NotImplementedError

    def pixel_variance(self) -> float:
        """v, the per-pixel variance of the prior's data about its per-channel mean; 1 where the prior
        does not record it (an upper bound for images in [-1, 1])."""
        return 1.0

    def dataset(self, split: str) -> ImageDataset | None:
        """The prior's own images of ``split`` where it can draw them exactly (an analytic prior's samples);
        None for a learned prior, whose images come from the data set it was trained on."""
        return None

    def run_networks_with(self, adapt: Callable[[ScoreFn], ScoreFn]) -> None:
        """Evaluate the score as ``adapt(score)`` from now on (mixed precision, compilation:
        :class:`~deftcli.devices.Runtime`)."""
        self.score = adapt(self.score)  # type: ignore[method-assign]
