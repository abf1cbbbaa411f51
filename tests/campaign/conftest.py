"""Registers the ``campaign`` marker (``pytest -m campaign`` runs just the campaign)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "campaign: the randomized fault campaign (seeded, bounded; issue 9)")
