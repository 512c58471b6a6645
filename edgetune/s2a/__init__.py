"""S2A: the activation-lean rewrite (compressed saved activations) applied on top of any recipe."""
