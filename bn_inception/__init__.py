"""BN-Inception (Ioffe & Szegedy, 2015) in JAX/Flax."""
