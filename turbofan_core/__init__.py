"""The contract every part shares: no Dagster or web imports here."""
