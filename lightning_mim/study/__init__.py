"""Label-efficiency study: pre-trained vs randomly initialised networks under the same budget (``study`` command)."""
