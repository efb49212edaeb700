"""The math of FORA in plain torch: covariances, bases, projections. No Lightning import."""
