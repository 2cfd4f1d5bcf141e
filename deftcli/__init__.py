"""deft: fine-tune an unconditional diffusion prior into a posterior sampler (online DEFT)."""

__version__ = "0.1.0"
