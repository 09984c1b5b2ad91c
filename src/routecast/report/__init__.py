"""What a reviewer reads: the Markdown report of a run against a base, and its figures."""
