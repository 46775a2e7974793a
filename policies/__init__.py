"""Pure decisions: no Ray, no I/O beyond reading a model's files. Fast to unit-test."""
