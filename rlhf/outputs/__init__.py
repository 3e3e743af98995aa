"""What a run leaves to read: metrics, diagnostics, the report."""
