"""Datasets: PanNuke (official folds or converted PNG layout) and UniToPatho."""
