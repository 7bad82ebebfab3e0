"""Validation workchains: every model against DFT on the same structures (``emlip.validate.*``)."""
