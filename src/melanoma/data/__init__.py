"""Data: sources -> preprocessing -> archive, with splits and downloads."""
