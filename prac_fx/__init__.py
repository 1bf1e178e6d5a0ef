"""prac_fx: a torch.compile backend that saves compressed activations for linear layers: by
default each input in 8-bit integers with stochastic rounding, or PRAC's projection ``x P`` with
the weight gradient in factored form.

    import prac_fx
    model = torch.compile(model, backend=prac_fx.backend())           # the default copy
    model = torch.compile(model, backend=prac_fx.backend(rank=0.25))  # PRAC n/4
"""
from prac_fx.backend import (FallbackError, PracBackend, allow_checkpoint_side_effects, backend,
                             prac_backend)
from prac_fx.config import PracConfig
from prac_fx.report import Report

__all__ = ["FallbackError", "PracBackend", "PracConfig", "Report", "allow_checkpoint_side_effects",
           "backend", "prac_backend"]
__version__ = "0.1.0"


def _register() -> None:
    """``backend="prac"``: an installed prac_fx declares it as an entry point (the registry loads
    it at first use); a checkout on ``sys.path`` without the install registers it here."""
    from prac_fx.passes import torch_seam

    torch_seam.register_backend("prac", prac_backend)


_register()
