"""Reporting: tables, statistics, the paper's claims, the figures, the run's results joined."""
