"""alignlab: teach a language model what its users prefer.

SFT, reward models (pairs and rankings), RLHF with PPO, rejection sampling, DPO and its family, and a lab
that runs them side by side on the same data.
"""

from alignlab.errors import AlignlabError

__version__ = "0.1.0"
__all__ = ["AlignlabError", "__version__"]
