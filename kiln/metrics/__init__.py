"""Metrics: thin wrappers over reference implementations (scikit-learn, scipy)."""
