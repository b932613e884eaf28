"""Hydra configuration tree, packaged so that installed entry points find it as `pkg://configs`.

Importing it (Hydra does, to read `pkg://configs`) registers the one resolver its YAML uses: `${times:a,b}`,
the product a·b to 12 significant digits, so that 0.05 × 6e-4 is 3e-5 and not 2.9999999999999997e-5 (the
paper's final lr as a fraction of the peak, configs/source_values/).
"""

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("times", lambda a, b: float(f"{float(a) * float(b):.12g}"), replace=True)
