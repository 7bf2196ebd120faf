"""Command-line tools that check the project's promises end to end (`python -m tools.NAME`)."""
