"""routecast: learn to predict Mixture-of-Experts routing from traces."""

__version__ = "0.1.0"
