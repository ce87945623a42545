"""The coordinator (`starling coordinator`): built by the coordinator issue on the core."""
