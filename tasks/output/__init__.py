"""The commit protocol of an output directory: the manifest, resuming into committed parts, and
the quality verdict that holds or publishes it."""
