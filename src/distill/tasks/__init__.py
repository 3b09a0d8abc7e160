"""Tasks: what differs between classification, detection, language modelling and ranking."""
