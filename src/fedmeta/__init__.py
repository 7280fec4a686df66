"""fedmeta: federated learning personalization, after Jiang, Konečný, Rush and Kannan (2019),
"Improving Federated Learning Personalization via Model Agnostic Meta Learning"."""

__version__ = "0.1.0"
