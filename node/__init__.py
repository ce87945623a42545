"""The node daemon (`starling node join`): built by the node issue on the core library."""
